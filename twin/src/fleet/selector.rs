//! Label selectors over car attributes, in the syntax Kubernetes uses for labels:
//! `model=tx7,market in (eu,uk),!test-fleet`. Requirements are separated by commas and all must
//! hold:
//!
//! | requirement | holds when |
//! |---|---|
//! | `key=value`, `key==value` | the car has `key` with that value |
//! | `key!=value` | the car has no `key`, or another value |
//! | `key in (a,b)` | the car has `key` with one of the values |
//! | `key notin (a,b)` | the car has no `key`, or a value not listed |
//! | `key` | the car has `key` |
//! | `!key` | the car has no `key` |
//!
//! Keys and values are checked as car attributes are (`validate_attribute`); an empty selector
//! selects every car. A selector that does not parse is refused with where and why.

use cardeploy_protocol::{Attributes, validate_attribute};

/// The longest selector accepted (an operator's input, kept in the deployment's record).
pub const MAX_SELECTOR: usize = 4096;

/// A parsed selector: every requirement must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// Why a selector was refused: the byte offset in the text and what is wrong there.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("selector {text:?}, at character {at}: {why}")]
pub struct SelectorError {
    pub text: String,
    pub at: usize,
    pub why: String,
}

impl Selector {
    /// Parse `text`.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        if text.len() > MAX_SELECTOR {
            return Err(SelectorError {
                text: text.chars().take(64).collect::<String>() + "…",
                at: MAX_SELECTOR,
                why: format!("longer than {MAX_SELECTOR} characters"),
            });
        }
        let mut parser = Parser { text, at: 0 };
        let mut requirements = Vec::new();
        parser.blanks();
        if parser.done() {
            return Ok(Self::default());
        }
        loop {
            requirements.push(parser.requirement()?);
            parser.blanks();
            if parser.done() {
                break;
            }
            parser.expect(',')?;
        }
        Ok(Self { requirements })
    }

    /// Whether a car with `attributes` is selected.
    pub fn matches(&self, attributes: &Attributes) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => attributes.get(k) == Some(v),
            Requirement::NotEquals(k, v) => attributes.get(k) != Some(v),
            Requirement::In(k, vs) => attributes.get(k).is_some_and(|a| vs.contains(a)),
            Requirement::NotIn(k, vs) => attributes.get(k).is_none_or(|a| !vs.contains(a)),
            Requirement::Exists(k) => attributes.contains_key(k),
            Requirement::DoesNotExist(k) => !attributes.contains_key(k),
        })
    }

    /// Whether it selects every car.
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }
}

struct Parser<'a> {
    text: &'a str,
    at: usize,
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.text[self.at..]
    }

    fn done(&self) -> bool {
        self.at >= self.text.len()
    }

    fn fail<T>(&self, why: impl Into<String>) -> Result<T, SelectorError> {
        Err(SelectorError {
            text: self.text.to_owned(),
            at: self.at,
            why: why.into(),
        })
    }

    fn blanks(&mut self) {
        let trimmed = self.rest().trim_start_matches([' ', '\t']);
        self.at = self.text.len() - trimmed.len();
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.rest().starts_with(token) {
            self.at += token.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: char) -> Result<(), SelectorError> {
        self.blanks();
        if self.rest().starts_with(c) {
            self.at += c.len_utf8();
            Ok(())
        } else {
            let found = self
                .rest()
                .chars()
                .next()
                .map_or("the end".into(), |f| format!("{f:?}"));
            self.fail(format!("expected {c:?}, found {found}"))
        }
    }

    /// A key or value: the characters attributes allow.
    fn word(&mut self) -> &str {
        let start = self.at;
        let len = self
            .rest()
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            .count();
        self.at += len;
        &self.text[start..self.at]
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        self.blanks();
        let at = self.at;
        let key = self.word().to_owned();
        if key.is_empty() {
            self.at = at;
            return self.fail("expected an attribute key");
        }
        if let Err(e) = validate_attribute(&key, "") {
            self.at = at;
            return self.fail(e.to_string());
        }
        Ok(key)
    }

    fn value(&mut self, key: &str) -> Result<String, SelectorError> {
        self.blanks();
        let at = self.at;
        let value = self.word().to_owned();
        if let Err(e) = validate_attribute(key, &value) {
            self.at = at;
            return self.fail(e.to_string());
        }
        Ok(value)
    }

    fn values(&mut self, key: &str) -> Result<Vec<String>, SelectorError> {
        self.expect('(')?;
        let mut values = Vec::new();
        loop {
            values.push(self.value(key)?);
            self.blanks();
            if self.eat(")") {
                return Ok(values);
            }
            self.expect(',')?;
        }
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        self.blanks();
        if self.eat("!") {
            return Ok(Requirement::DoesNotExist(self.key()?));
        }
        let key = self.key()?;
        self.blanks();
        let before = self.at;
        let word = self.word().to_owned();
        match word.as_str() {
            "in" => {
                let values = self.values(&key)?;
                return Ok(Requirement::In(key, values));
            }
            "notin" => {
                let values = self.values(&key)?;
                return Ok(Requirement::NotIn(key, values));
            }
            "" => {}
            _ => {
                self.at = before;
                return self.fail(format!(
                    "expected an operator (=, ==, !=, in, notin) after {key:?}"
                ));
            }
        }
        if self.eat("==") || self.eat("=") {
            return Ok(Requirement::Equals(key.clone(), self.value(&key)?));
        }
        if self.eat("!=") {
            return Ok(Requirement::NotEquals(key.clone(), self.value(&key)?));
        }
        if self.done() || self.rest().starts_with(',') {
            return Ok(Requirement::Exists(key));
        }
        self.fail(format!(
            "expected an operator (=, ==, !=, in, notin) after {key:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn car(pairs: &[(&str, &str)]) -> Attributes {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn each_operator_selects_as_kubernetes_does() {
        let eu_tx7 = car(&[("model", "tx7"), ("market", "eu")]);
        let uk_tx7_test = car(&[("model", "tx7"), ("market", "uk"), ("test-fleet", "")]);
        let us_tx9 = car(&[("model", "tx9"), ("market", "us")]);
        let bare = car(&[]);
        let table: &[(&str, [bool; 4])] = &[
            ("", [true, true, true, true]),
            ("model=tx7", [true, true, false, false]),
            ("model==tx7", [true, true, false, false]),
            ("model!=tx7", [false, false, true, true]),
            ("market in (eu,uk)", [true, true, false, false]),
            ("market notin (eu, uk)", [false, false, true, true]),
            ("test-fleet", [false, true, false, false]),
            ("!test-fleet", [true, false, true, true]),
            (
                "model=tx7,market in (eu,uk),!test-fleet",
                [true, false, false, false],
            ),
            (
                " model = tx7 , market in ( eu , uk ) ",
                [true, true, false, false],
            ),
        ];
        for (text, want) in table {
            let s = Selector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let got = [&eu_tx7, &uk_tx7_test, &us_tx9, &bare].map(|c| s.matches(c));
            assert_eq!(&got, want, "{text}");
        }
    }

    #[test]
    fn a_selector_that_does_not_parse_says_where_and_why() {
        for (text, at, why) in [
            ("model=-x", 6, "values are"),
            ("=tx7", 0, "expected an attribute key"),
            ("model tx7", 6, "expected an operator"),
            ("market in eu", 10, "expected '('"),
            ("market in (eu", 13, "expected ','"),
            ("model=tx7,", 10, "expected an attribute key"),
            ("model=tx7;market=eu", 9, "expected ','"),
            ("mo/del=tx7", 2, "expected an operator"),
            ("model=t x7", 8, "expected ','"),
        ] {
            let e = Selector::parse(text).expect_err(text);
            assert_eq!(e.at, at, "{text}: {e}");
            assert!(e.why.contains(why), "{text}: {e}");
        }
        let long = "a=b,".repeat(MAX_SELECTOR);
        assert!(
            Selector::parse(&long)
                .unwrap_err()
                .why
                .contains("longer than")
        );
    }

    #[test]
    fn in_with_an_empty_value_matches_a_flag_attribute() {
        let s = Selector::parse("test-fleet in ()").unwrap();
        assert!(s.matches(&car(&[("test-fleet", "")])));
        assert!(!s.matches(&car(&[("test-fleet", "yes")])));
    }
}
