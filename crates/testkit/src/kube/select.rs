//! Label selectors (`a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`) and the
//! `metadata.name` / `metadata.namespace` field selectors, as list and watch requests carry them.

use serde_json::Value;

#[derive(Clone, Debug)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

#[derive(Clone, Debug, Default)]
pub struct Selector {
    labels: Vec<Term>,
    fields: Vec<(String, String, bool)>,
}

/// Splits on commas outside parentheses.
fn terms(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut current) = (0i32, String::new());
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    out.push(current);
    out.into_iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

fn set(values: &str) -> Result<Vec<String>, String> {
    let inner = values
        .trim()
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(|| format!("`{values}` is not a (set, of, values)"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect())
}

impl Selector {
    pub fn parse(labels: &str, fields: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for t in terms(labels) {
            let term = if let Some((k, v)) = t.split_once("!=") {
                Term::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once(" notin ") {
                Term::NotIn(k.trim().into(), set(v)?)
            } else if let Some((k, v)) = t.split_once(" in ") {
                Term::In(k.trim().into(), set(v)?)
            } else if let Some(k) = t.strip_prefix('!') {
                Term::Absent(k.trim().into())
            } else if t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                Term::Exists(t)
            } else {
                return Err(format!("unable to parse requirement: `{t}`"));
            };
            out.labels.push(term);
        }
        for t in terms(fields) {
            let (k, v, eq) = match t.split_once("!=") {
                Some((k, v)) => (k, v, false),
                None => match t.split_once("==").or_else(|| t.split_once('=')) {
                    Some((k, v)) => (k, v, true),
                    None => return Err(format!("invalid field selector: `{t}`")),
                },
            };
            let k = k.trim();
            if k != "metadata.name" && k != "metadata.namespace" {
                return Err(format!("field label not supported: {k}"));
            }
            out.fields.push((k.to_owned(), v.trim().to_owned(), eq));
        }
        Ok(out)
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|t| match t {
            Term::Eq(k, v) => label(k) == Some(v.as_str()),
            Term::Ne(k, v) => label(k) != Some(v.as_str()),
            Term::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Term::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            Term::Exists(k) => label(k).is_some(),
            Term::Absent(k) => label(k).is_none(),
        });
        let fields_ok = self.fields.iter().all(|(k, v, eq)| {
            let field = k.strip_prefix("metadata.").unwrap_or(k);
            (object["metadata"][field].as_str() == Some(v.as_str())) == *eq
        });
        labels_ok && fields_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_match_as_the_api_server_matches_them() {
        let pod = json!({"metadata": {"name": "p", "labels": {"app": "nav", "track": "canary"}}});
        for (sel, want) in [
            ("app=nav", true),
            ("app==nav,track=canary", true),
            ("app!=nav", false),
            ("track in (stable, canary)", true),
            ("track notin (canary)", false),
            ("app", true),
            ("!tier", true),
            ("!app", false),
            ("", true),
        ] {
            assert_eq!(
                Selector::parse(sel, "").unwrap().matches(&pod),
                want,
                "{sel}"
            );
        }
        assert!(
            Selector::parse("", "metadata.name=p")
                .unwrap()
                .matches(&pod)
        );
        assert!(
            !Selector::parse("", "metadata.name!=p")
                .unwrap()
                .matches(&pod)
        );
        assert!(Selector::parse("", "spec.nodeName=x").is_err());
    }
}
