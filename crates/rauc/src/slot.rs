//! Slot status as `GetSlotStatus` reports it: an array of `(slot name, a{sv})`, decoded into
//! [`SlotStatus`]. The keys are those RAUC 1.8 writes in `convert_slot_status_to_dict`; keys it
//! may add later land in [`SlotStatus::extra`] as text rather than being dropped or refused.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use zbus::{OwnedVariant, Variant};

use crate::Error;

/// The status of one slot, as RAUC reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    /// `rootfs.0`
    pub name: String,
    /// `rootfs`
    pub class: String,
    /// The device (or file) behind the slot.
    pub device: String,
    /// `ext4`, `raw`, ...
    pub slot_type: String,
    /// The name the bootloader knows the slot by (`A`), for bootable slots.
    pub bootname: Option<String>,
    pub state: SlotState,
    /// `good` or `bad`, for bootable slots.
    pub boot_status: Option<String>,
    pub bundle_compatible: Option<String>,
    pub bundle_version: Option<String>,
    pub installed_timestamp: Option<String>,
    pub sha256: Option<String>,
    /// Every other key RAUC sent, rendered as text (numbers in decimal).
    pub extra: BTreeMap<String, String>,
}

/// Whether a slot is the one running, part of the running group, or not.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum SlotState {
    Booted,
    Active,
    Inactive,
    /// A state this client does not know, kept as RAUC spelled it.
    Other(String),
}

impl SlotState {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Booted => "booted",
            Self::Active => "active",
            Self::Inactive => "inactive",
            Self::Other(s) => s,
        }
    }
}

impl From<String> for SlotState {
    fn from(s: String) -> Self {
        match s.as_str() {
            "booted" => Self::Booted,
            "active" => Self::Active,
            "inactive" => Self::Inactive,
            _ => Self::Other(s),
        }
    }
}

impl From<SlotState> for String {
    fn from(s: SlotState) -> Self {
        match s {
            SlotState::Other(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

impl fmt::Display for SlotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decodes one `(name, a{sv})` entry of `GetSlotStatus`.
///
/// `class`, `device`, `type` and `state` are required (RAUC always sends them); the other known
/// keys are optional; every known key must hold a string. Anything else goes to `extra`.
pub(crate) fn decode_slot(
    name: String,
    mut dict: HashMap<String, OwnedVariant>,
) -> Result<SlotStatus, Error> {
    let mut take = |key: &str| -> Result<Option<String>, Error> {
        match dict.remove(key) {
            None => Ok(None),
            Some(v) => match &*v {
                Variant::Str(s) => Ok(Some(s.to_string())),
                other => Err(Error::Decode {
                    what: format!("slot status of {name}, key {key:?}"),
                    why: format!("expected a string, got type {}", other.value_signature()),
                }),
            },
        }
    };
    let mut required = |key: &str| -> Result<String, Error> {
        take(key)?.ok_or_else(|| Error::Decode {
            what: format!("slot status of {name}"),
            why: format!("key {key:?} is missing"),
        })
    };
    let class = required("class")?;
    let device = required("device")?;
    let slot_type = required("type")?;
    let state = SlotState::from(required("state")?);
    let bootname = take("bootname")?;
    let boot_status = take("boot-status")?;
    let bundle_compatible = take("bundle.compatible")?;
    let bundle_version = take("bundle.version")?;
    let installed_timestamp = take("installed.timestamp")?;
    let sha256 = take("sha256")?;
    let extra = dict
        .into_iter()
        .map(|(k, v)| (k, render(&v)))
        .collect::<BTreeMap<_, _>>();
    Ok(SlotStatus {
        name,
        class,
        device,
        slot_type,
        bootname,
        state,
        boot_status,
        bundle_compatible,
        bundle_version,
        installed_timestamp,
        sha256,
        extra,
    })
}

/// A variant as a person would write it: strings bare, numbers in decimal; containers in
/// GVariant text form (zbus's `Display`).
fn render(v: &Variant<'_>) -> String {
    match v {
        Variant::Str(s) => s.to_string(),
        Variant::Bool(b) => b.to_string(),
        Variant::U8(n) => n.to_string(),
        Variant::I16(n) => n.to_string(),
        Variant::U16(n) => n.to_string(),
        Variant::I32(n) => n.to_string(),
        Variant::U32(n) => n.to_string(),
        Variant::I64(n) => n.to_string(),
        Variant::U64(n) => n.to_string(),
        Variant::F64(n) => n.to_string(),
        Variant::ObjectPath(p) => p.as_str().to_owned(),
        Variant::Signature(s) => s.to_string(),
        Variant::Variant(inner) => render(inner),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::Str;

    fn s(v: &str) -> OwnedVariant {
        OwnedVariant::from(Str::from(v.to_owned()))
    }

    /// What RAUC 1.8 sent for slot B of the test system after an installation.
    fn installed_b() -> HashMap<String, OwnedVariant> {
        let mut d = HashMap::new();
        d.insert("class".into(), s("rootfs"));
        d.insert("device".into(), s("/tmp/x/slot-b.img"));
        d.insert("type".into(), s("ext4"));
        d.insert("bootname".into(), s("B"));
        d.insert("state".into(), s("inactive"));
        d.insert("boot-status".into(), s("good"));
        d.insert("bundle.compatible".into(), s("cardeploy-test"));
        d.insert("bundle.version".into(), s("1.0.0"));
        d.insert("status".into(), s("ok"));
        d.insert("sha256".into(), s("ab12"));
        d.insert("size".into(), OwnedVariant::from(25_165_824u64));
        d.insert("installed.timestamp".into(), s("2026-11-26T00:36:10Z"));
        d.insert("installed.count".into(), OwnedVariant::from(3u32));
        d
    }

    #[test]
    fn a_full_slot_status_decodes_known_keys_and_keeps_the_rest_as_text() {
        let slot = decode_slot("rootfs.1".into(), installed_b()).unwrap();
        assert_eq!(slot.name, "rootfs.1");
        assert_eq!(slot.class, "rootfs");
        assert_eq!(slot.device, "/tmp/x/slot-b.img");
        assert_eq!(slot.slot_type, "ext4");
        assert_eq!(slot.bootname.as_deref(), Some("B"));
        assert_eq!(slot.state, SlotState::Inactive);
        assert_eq!(slot.boot_status.as_deref(), Some("good"));
        assert_eq!(slot.bundle_compatible.as_deref(), Some("cardeploy-test"));
        assert_eq!(slot.bundle_version.as_deref(), Some("1.0.0"));
        assert_eq!(
            slot.installed_timestamp.as_deref(),
            Some("2026-11-26T00:36:10Z")
        );
        assert_eq!(slot.sha256.as_deref(), Some("ab12"));
        let extra: Vec<(&str, &str)> = slot
            .extra
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            extra,
            [
                ("installed.count", "3"),
                ("size", "25165824"),
                ("status", "ok")
            ]
        );
    }

    #[test]
    fn a_minimal_slot_status_has_no_optional_fields() {
        let mut d = HashMap::new();
        d.insert("class".into(), s("appfs"));
        d.insert("device".into(), s("/dev/sda3"));
        d.insert("type".into(), s("raw"));
        d.insert("state".into(), s("active"));
        let slot = decode_slot("appfs.0".into(), d).unwrap();
        assert_eq!(slot.state, SlotState::Active);
        assert_eq!(slot.bootname, None);
        assert_eq!(slot.boot_status, None);
        assert!(slot.extra.is_empty());
    }

    #[test]
    fn an_unknown_state_is_kept_as_spelled() {
        let mut d = installed_b();
        d.insert("state".into(), s("degraded"));
        let slot = decode_slot("rootfs.1".into(), d).unwrap();
        assert_eq!(slot.state, SlotState::Other("degraded".into()));
    }

    #[test]
    fn a_known_key_of_the_wrong_type_is_a_decode_error() {
        let mut d = installed_b();
        d.insert("bootname".into(), OwnedVariant::from(1u32));
        let err = decode_slot("rootfs.1".into(), d).unwrap_err();
        match err {
            Error::Decode { what, why } => {
                assert!(
                    what.contains("rootfs.1") && what.contains("bootname"),
                    "{what}"
                );
                assert!(why.contains("string") && why.contains('u'), "{why}");
            }
            other => panic!("expected Decode, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_required_key_is_a_decode_error() {
        let mut d = installed_b();
        d.remove("device");
        let err = decode_slot("rootfs.1".into(), d).unwrap_err();
        assert!(
            matches!(&err, Error::Decode { why, .. } if why.contains("device")),
            "{err:?}"
        );
    }

    #[test]
    fn nested_and_container_values_are_rendered_without_panicking() {
        let mut d = installed_b();
        d.insert(
            "wrapped".into(),
            OwnedVariant::try_from(Variant::Variant(Box::new(Variant::from("inner")))).unwrap(),
        );
        d.insert(
            "list".into(),
            OwnedVariant::try_from(Variant::from(vec!["a", "b"])).unwrap(),
        );
        d.insert("flag".into(), OwnedVariant::from(true));
        let slot = decode_slot("rootfs.1".into(), d).unwrap();
        assert_eq!(slot.extra["wrapped"], "inner");
        assert_eq!(slot.extra["flag"], "true");
        assert!(slot.extra["list"].contains('a') && slot.extra["list"].contains('b'));
    }

    #[test]
    fn slot_state_serialises_as_lowercase_strings() {
        let states = [
            SlotState::Booted,
            SlotState::Active,
            SlotState::Inactive,
            SlotState::Other("degraded".into()),
        ];
        let json = serde_json::to_string(&states).unwrap();
        assert_eq!(json, r#"["booted","active","inactive","degraded"]"#);
        let back: Vec<SlotState> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, states);
    }
}
