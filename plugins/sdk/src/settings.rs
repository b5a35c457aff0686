//! Typed plugin settings.
//!
//! Every plugin receives its settings as a JSON object in a string (`{}` when the user set
//! none). Declare a struct with serde defaults and parse it with [`parse_settings`]:
//!
//! ```
//! use celery_operator_plugin_sdk::parse_settings;
//! use serde::Deserialize;
//!
//! #[derive(Deserialize, Default, Debug)]
//! #[serde(default, rename_all = "camelCase", deny_unknown_fields)]
//! struct Settings {
//!     polling_interval: Option<u32>,
//! }
//!
//! let s: Settings = parse_settings(r#"{"pollingInterval": 15}"#).unwrap();
//! assert_eq!(s.polling_interval, Some(15));
//!
//! let err = parse_settings::<Settings>(r#"{"pollingInterval": "soon"}"#).unwrap_err();
//! assert_eq!(err, r#"settings.pollingInterval: invalid type: string "soon", expected u32"#);
//! ```

use serde::de::DeserializeOwned;

/// Parses a plugin's `settings` JSON into `T`.
///
/// An empty (or all-whitespace) string counts as `{}`. On error the message starts with
/// the path of the offending field, for example
/// `settings.fallback.replicas: invalid type: string "x", expected u32`, so it can be
/// returned to the host as it is (the host shows it in the resource's status).
///
/// Use `#[serde(default)]` on the struct (with a `Default` impl carrying the documented
/// defaults) so that every field is optional, and `#[serde(deny_unknown_fields)]` to catch
/// misspelt settings.
pub fn parse_settings<T: DeserializeOwned>(settings: &str) -> Result<T, String> {
    parse_json_at("settings", settings)
}

/// Parses the JSON object `text` into `T`; on error the message starts with `what`
/// followed by the path of the offending field (for example
/// `autoscaling.metrics[1].target`).
///
/// An empty string counts as `{}`; any other JSON value than an object is an error (serde
/// would otherwise accept an array for a struct). [`parse_settings`] is this with
/// `what = "settings"`.
pub fn parse_json_at<T: DeserializeOwned>(what: &str, text: &str) -> Result<T, String> {
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return serde_json::from_str("{}").map_err(|e| describe_error(what, "{}", &e));
    }
    if !trimmed.starts_with('{') {
        return Err(format!("{what}: expected a JSON object"));
    }
    serde_json::from_str(text).map_err(|e| describe_error(what, text, &e))
}

/// Turns a serde_json error into `<what><path>: <message>` without the line/column suffix.
fn describe_error(what: &str, text: &str, err: &serde_json::Error) -> String {
    let full = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full);
    if err.line() == 0 {
        return format!("{what}: {message}");
    }
    let path = json_path_at(text, byte_offset(text, err.line(), err.column()));
    format!("{what}{path}: {message}")
}

/// Byte offset just after the `column`th byte of the 1-based `line` (serde_json's error
/// position: the last byte it read).
fn byte_offset(text: &str, line: usize, column: usize) -> usize {
    let line_start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    (line_start + column).min(text.len())
}

/// One open JSON container while scanning.
enum Frame {
    /// An object, with the key whose value is being read (if a key was read).
    Object {
        key: Option<String>,
        expect_key: bool,
    },
    /// An array, with the index of the element being read.
    Array { index: usize },
}

/// The path (`.a.b[2].c`) of the value being read at byte offset `end` of the JSON
/// `text`: a small scanner, enough to name the field a serde_json error is about.
fn json_path_at(text: &str, end: usize) -> String {
    let bytes = &text.as_bytes()[..end];
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' => stack.push(Frame::Object {
                key: None,
                expect_key: true,
            }),
            b'[' => stack.push(Frame::Array { index: 0 }),
            // The error may be about the container just closed (say, a missing field):
            // keep it as the path when the scan ends on its closing bracket.
            b'}' | b']' if i + 1 < bytes.len() => {
                stack.pop();
            }
            b':' => {
                if let Some(Frame::Object { expect_key, .. }) = stack.last_mut() {
                    *expect_key = false;
                }
            }
            b',' => match stack.last_mut() {
                Some(Frame::Object { key, expect_key }) => {
                    *key = None;
                    *expect_key = true;
                }
                Some(Frame::Array { index }) => *index += 1,
                None => {}
            },
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                if let Some(Frame::Object {
                    key,
                    expect_key: true,
                }) = stack.last_mut()
                {
                    let raw = &bytes[start..i.min(bytes.len())];
                    *key = Some(unescape(raw));
                }
            }
            _ => {}
        }
        i += 1;
    }
    let mut path = String::new();
    for frame in &stack {
        match frame {
            Frame::Object { key: Some(k), .. } => {
                path.push('.');
                path.push_str(k);
            }
            Frame::Object { key: None, .. } => {}
            Frame::Array { index } => path.push_str(&format!("[{index}]")),
        }
    }
    path
}

/// A JSON key's text from its raw bytes: enough unescaping for an error message (`\"`
/// and `\\`; other escapes are kept as written).
fn unescape(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter();
    while let Some(&b) = bytes.next() {
        if b == b'\\' {
            match bytes.next() {
                Some(&next @ (b'"' | b'\\')) => out.push(next),
                Some(&next) => out.extend_from_slice(&[b, next]),
                None => out.push(b),
            }
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(default, rename_all = "camelCase", deny_unknown_fields)]
    struct Settings {
        polling_interval: u32,
        fallback: Fallback,
        steps: Vec<u32>,
    }

    impl Default for Settings {
        fn default() -> Self {
            Settings {
                polling_interval: 30,
                fallback: Fallback::default(),
                steps: vec![0, 3],
            }
        }
    }

    #[derive(Deserialize, Debug, PartialEq, Default)]
    #[serde(default, rename_all = "camelCase", deny_unknown_fields)]
    struct Fallback {
        replicas: Option<u32>,
    }

    #[test]
    fn empty_and_blank_mean_defaults() {
        assert_eq!(parse_settings::<Settings>("").unwrap(), Settings::default());
        assert_eq!(
            parse_settings::<Settings>(" \n").unwrap(),
            Settings::default()
        );
        assert_eq!(
            parse_settings::<Settings>("{}").unwrap(),
            Settings::default()
        );
    }

    #[test]
    fn values_override_defaults() {
        let s: Settings =
            parse_settings(r#"{"pollingInterval": 5, "fallback": {"replicas": 2}}"#).unwrap();
        assert_eq!(s.polling_interval, 5);
        assert_eq!(s.fallback.replicas, Some(2));
        assert_eq!(s.steps, vec![0, 3]);
    }

    #[test]
    fn errors_name_the_field() {
        let err = parse_settings::<Settings>(r#"{"pollingInterval": "x"}"#).unwrap_err();
        assert_eq!(
            err,
            r#"settings.pollingInterval: invalid type: string "x", expected u32"#
        );
        let err =
            parse_settings::<Settings>("{\n  \"fallback\": {\"replicas\": -1}\n}").unwrap_err();
        assert!(err.starts_with("settings.fallback.replicas: "), "{err}");
        let err = parse_settings::<Settings>(r#"{"steps": [0, 3, "six"]}"#).unwrap_err();
        assert!(err.starts_with("settings.steps[2]: "), "{err}");
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = parse_settings::<Settings>(r#"{"pollingIntervall": 5}"#).unwrap_err();
        assert!(
            err.starts_with("settings.pollingIntervall: unknown field `pollingIntervall`"),
            "{err}"
        );
    }

    #[test]
    fn escaped_keys() {
        let err = parse_settings::<Settings>(r#"{"a\"b\\c\u0041": 1}"#).unwrap_err();
        assert!(
            err.starts_with(r#"settings.a"b\c\u0041: unknown field"#),
            "{err}"
        );
    }

    #[test]
    fn not_an_object() {
        let err = parse_settings::<Settings>("[1]").unwrap_err();
        assert_eq!(err, "settings: expected a JSON object");
        let err = parse_settings::<Settings>("{").unwrap_err();
        assert!(err.starts_with("settings: EOF"), "{err}");
    }
}
