//! What a client asks, parsed from the request line and headers: pure functions, fuzzed
//! (`fuzz/fuzz_targets/registry_request.rs`), since any local process can send anything.

use cardeploy_chunks::Digest;

use crate::manifest;

/// An endpoint of the distribution spec's pull side (and the push endpoints, to refuse them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    Manifest {
        name: String,
        reference: Reference,
    },
    Blob {
        name: String,
        digest: Digest,
    },
    Tags {
        name: String,
    },
    /// `/v2/<name>/blobs/uploads/…`: pushing, which a read-only registry refuses.
    Upload {
        name: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

/// Why a path is not an endpoint, in the spec's error codes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bad {
    /// Not a distribution endpoint at all.
    NotFound,
    NameInvalid(String),
    DigestInvalid(String),
    /// A reference that is neither a valid tag nor a digest.
    ManifestInvalid(String),
}

/// Parses a request path (already percent-decoded where the spec allows encoding: the `:` of a
/// digest).
pub fn route(path: &str) -> Result<Route, Bad> {
    if path == "/v2/" || path == "/v2" {
        return Ok(Route::Base);
    }
    let rest = path.strip_prefix("/v2/").ok_or(Bad::NotFound)?;
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok(Route::Tags {
            name: name_of(name)?,
        });
    }
    if let Some((name, _)) = rest.split_once("/blobs/uploads") {
        return Ok(Route::Upload {
            name: name_of(name)?,
        });
    }
    let (head, last) = rest.rsplit_once('/').ok_or(Bad::NotFound)?;
    let (name, kind) = head.rsplit_once('/').ok_or(Bad::NotFound)?;
    match kind {
        "manifests" => {
            let reference = if last.contains(':') {
                Reference::Digest(manifest::parse_digest(last).map_err(Bad::DigestInvalid)?)
            } else if manifest::valid_tag(last) {
                Reference::Tag(last.to_owned())
            } else {
                return Err(Bad::ManifestInvalid(format!(
                    "`{last}` is neither a tag nor a digest"
                )));
            };
            Ok(Route::Manifest {
                name: name_of(name)?,
                reference,
            })
        }
        "blobs" => Ok(Route::Blob {
            name: name_of(name)?,
            digest: manifest::parse_digest(last).map_err(Bad::DigestInvalid)?,
        }),
        _ => Err(Bad::NotFound),
    }
}

fn name_of(name: &str) -> Result<String, Bad> {
    if manifest::valid_repository(name) {
        Ok(name.to_owned())
    } else {
        Err(Bad::NameInvalid(format!(
            "`{name}` is not a valid repository name"
        )))
    }
}

/// The `:` of a digest may arrive percent-encoded; nothing else in a valid path is encoded.
pub fn decode_path(raw: &str) -> String {
    raw.replace("%3A", ":").replace("%3a", ":")
}

/// What part of a blob of `size` bytes a `Range` header asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Span {
    Whole,
    /// Bytes `start..=end`.
    Part {
        start: u64,
        end: u64,
    },
    /// A range that starts beyond the blob: 416.
    Unsatisfiable,
}

/// RFC 9110 §14.2: a single `bytes=` range; a header in another unit, malformed, or asking for
/// several ranges is ignored (the whole blob is sent), which the RFC allows.
pub fn span(header: Option<&str>, size: u64) -> Span {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Span::Whole;
    };
    if spec.contains(',') {
        return Span::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Span::Whole;
    };
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim(), last.trim()) {
        ("", suffix) => match number(suffix) {
            None => Span::Whole,
            Some(0) => Span::Unsatisfiable,
            Some(_) if size == 0 => Span::Unsatisfiable,
            Some(n) => Span::Part {
                start: size.saturating_sub(n),
                end: size - 1,
            },
        },
        (first, "") => match number(first) {
            None => Span::Whole,
            Some(start) if start >= size => Span::Unsatisfiable,
            Some(start) => Span::Part {
                start,
                end: size - 1,
            },
        },
        (first, last) => match (number(first), number(last)) {
            (Some(start), Some(end)) if start <= end => {
                if start >= size {
                    Span::Unsatisfiable
                } else {
                    Span::Part {
                        start,
                        end: end.min(size - 1),
                    }
                }
            }
            _ => Span::Whole,
        },
    }
}

/// Whether `Accept` headers admit `media_type`: no header, `*/*`, `application/*` or the type
/// itself (parameters such as `q=` are ignored; a client that lists a type wants it).
pub fn accepts<'a>(accept: impl Iterator<Item = &'a str>, media_type: &str) -> bool {
    let mut any_header = false;
    for header in accept {
        for item in header.split(',') {
            let item = item.split(';').next().unwrap_or("").trim();
            if item.is_empty() {
                continue;
            }
            any_header = true;
            if item == "*/*"
                || item == media_type
                || (item == "application/*" && media_type.starts_with("application/"))
            {
                return true;
            }
        }
    }
    !any_header
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    #[test]
    fn the_pull_endpoints_are_recognised() {
        assert_eq!(route("/v2/"), Ok(Route::Base));
        assert_eq!(
            route("/v2/cardeploy/nav/manifests/1.0"),
            Ok(Route::Manifest {
                name: "cardeploy/nav".into(),
                reference: Reference::Tag("1.0".into())
            })
        );
        assert!(matches!(
            route(&format!("/v2/nav/manifests/{}", d(1))),
            Ok(Route::Manifest {
                reference: Reference::Digest(_),
                ..
            })
        ));
        assert!(matches!(
            route(&format!("/v2/a/b/blobs/{}", d(2))),
            Ok(Route::Blob { .. })
        ));
        assert_eq!(
            route("/v2/a/tags/list"),
            Ok(Route::Tags { name: "a".into() })
        );
        assert_eq!(
            route("/v2/a/blobs/uploads/"),
            Ok(Route::Upload { name: "a".into() })
        );
        // A repository may be called `manifests`: the last two segments decide.
        assert!(matches!(
            route("/v2/manifests/manifests/x"),
            Ok(Route::Manifest { .. })
        ));
    }

    #[test]
    fn bad_paths_get_the_spec_codes() {
        assert_eq!(route("/v1/x"), Err(Bad::NotFound));
        assert_eq!(route("/v2/x/other/y"), Err(Bad::NotFound));
        assert!(matches!(
            route("/v2/UP/manifests/x"),
            Err(Bad::NameInvalid(_))
        ));
        assert!(matches!(
            route("/v2/../manifests/x"),
            Err(Bad::NameInvalid(_))
        ));
        assert!(matches!(
            route("/v2/a/blobs/sha256:zz"),
            Err(Bad::DigestInvalid(_))
        ));
        assert!(matches!(
            route("/v2/a/blobs/latest"),
            Err(Bad::DigestInvalid(_))
        ));
        assert!(matches!(
            route("/v2/a/manifests/-x"),
            Err(Bad::ManifestInvalid(_))
        ));
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(span(None, 10), Span::Whole);
        assert_eq!(span(Some("bytes=0-3"), 10), Span::Part { start: 0, end: 3 });
        assert_eq!(span(Some("bytes=4-"), 10), Span::Part { start: 4, end: 9 });
        assert_eq!(span(Some("bytes=-3"), 10), Span::Part { start: 7, end: 9 });
        assert_eq!(span(Some("bytes=-30"), 10), Span::Part { start: 0, end: 9 });
        assert_eq!(
            span(Some("bytes=5-100"), 10),
            Span::Part { start: 5, end: 9 }
        );
        assert_eq!(span(Some("bytes=10-"), 10), Span::Unsatisfiable);
        assert_eq!(span(Some("bytes=-0"), 10), Span::Unsatisfiable);
        assert_eq!(span(Some("bytes=0-"), 0), Span::Unsatisfiable);
        // Ignored, whole blob: another unit, several ranges, nonsense, an inverted range.
        assert_eq!(span(Some("items=0-1"), 10), Span::Whole);
        assert_eq!(span(Some("bytes=0-1,3-4"), 10), Span::Whole);
        assert_eq!(span(Some("bytes=x-1"), 10), Span::Whole);
        assert_eq!(span(Some("bytes=5-1"), 10), Span::Whole);
        assert_eq!(
            span(Some("bytes=99999999999999999999999-"), 10),
            Span::Whole
        );
    }

    #[test]
    fn accept_lists_decide_what_a_client_takes() {
        let oci = manifest::OCI_MANIFEST;
        assert!(accepts(std::iter::empty(), oci));
        assert!(accepts(["application/json, */*;q=0.1"].into_iter(), oci));
        assert!(accepts([manifest::DOCKER_MANIFEST, oci].into_iter(), oci));
        assert!(!accepts([manifest::DOCKER_MANIFEST].into_iter(), oci));
        assert!(!accepts(
            [format!("{}; q=0.5", manifest::OCI_INDEX).as_str()].into_iter(),
            oci
        ));
    }
}
