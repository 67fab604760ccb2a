//! Metadata JSON written byte for byte as pcocc's Python writes it (`json.dump` with the
//! default settings): `", "` and `": "` separators, no trailing newline, non-ASCII
//! escaped as `\uXXXX` (`ensure_ascii`), and floats as Python's `repr`. A repository
//! written by this project then reads the same to pcocc, to `diff` and to checksums as
//! one pcocc wrote itself.

use std::io::{self, Write};

use serde::Serialize;

/// Serializes `value` the way Python's `json.dumps(value)` would.
pub fn to_python_json<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    value.serialize(&mut ser)?;
    Ok(out)
}

/// serde_json's compact output, re-spaced and re-escaped like Python's defaults.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_f64<W: ?Sized + Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(python_float_repr(value).as_bytes())
    }

    fn write_f32<W: ?Sized + Write>(&mut self, w: &mut W, value: f32) -> io::Result<()> {
        w.write_all(python_float_repr(f64::from(value)).as_bytes())
    }

    fn write_string_fragment<W: ?Sized + Write>(&mut self, w: &mut W, s: &str) -> io::Result<()> {
        // Python's ensure_ascii escapes everything outside printable ASCII (space to
        // `~`); serde_json has already escaped quotes, backslashes and control bytes.
        if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return w.write_all(s.as_bytes());
        }
        for c in s.chars() {
            if (' '..='~').contains(&c) {
                let mut b = [0u8; 4];
                w.write_all(c.encode_utf8(&mut b).as_bytes())?;
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(w, "\\u{u:04x}")?;
                }
            }
        }
        Ok(())
    }
}

/// Python's `repr(float)`: the shortest digits that read back to the same value, in
/// fixed notation when the decimal exponent is in -4..16 (with `.0` for integral
/// values), else scientific with a signed two-digit-minimum exponent (`1e+16`).
/// JSON has no NaN or infinity; Python writes these names, and so does this.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    // Rust's `{:e}` gives the shortest round-trip digits as `d.ddde[-]N`.
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            let (int_part, frac) = if digits.len() > int_len {
                (digits[..int_len].to_string(), digits[int_len..].to_string())
            } else {
                (format!("{digits:0<int_len$}"), "0".to_string())
            };
            format!("{sign}{int_part}.{frac}")
        } else {
            let zeros = "0".repeat((-exp - 1) as usize);
            format!("{sign}0.{zeros}{digits}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let dot = if rest.is_empty() { "" } else { "." };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{dot}{rest}e{esign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python_repr() {
        let cases = [
            (1795749382.4048052, "1795749382.4048052"),
            (1795749396.997462, "1795749396.997462"),
            (1795749391.94215, "1795749391.94215"),
            (1500000000.5, "1500000000.5"),
            (1500000000.0, "1500000000.0"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e20, "1.2345e+20"),
            (-2.5, "-2.5"),
            (123.0, "123.0"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "repr of {x:?}");
        }
    }

    #[test]
    fn objects_and_arrays_use_python_separators_and_ascii_escapes() {
        let v = serde_json::json!({"a": [1, 2.5, "x"], "b": {}, "c": [], "d": "é\u{1F600}\u{7f}\n\"", "e": null, "f": true});
        let out = String::from_utf8(to_python_json(&v).unwrap()).unwrap();
        assert_eq!(
            out,
            r#"{"a": [1, 2.5, "x"], "b": {}, "c": [], "d": "\u00e9\ud83d\ude00\u007f\n\"", "e": null, "f": true}"#
        );
    }
}
