//! Disk sizes as `pcocc image resize` takes them: pcocc hands the text to `qemu-img
//! create`, so the syntax is qemu's, learned by running it: an integer (decimal, or hex
//! with `0x`) of bytes, or a decimal number with an optional fraction followed by one
//! unit letter `b k m g t p e` in either case (powers of 1024). Leading blanks and a `+`
//! are allowed; nothing may follow the unit. A fraction needs a unit other than `b`; the
//! bytes it gives are truncated, and the size is then rounded up to whole 512-byte
//! sectors, as qemu does.

use crate::image::qcow2_layout::{MAX_VIRTUAL_SIZE, SECTOR_SIZE, align_up};

/// Largest size qemu parses at all (`INT64_MAX`).
const MAX_PARSED: u128 = i64::MAX as u128;
/// Fraction digits taken into account; more cannot change the byte count but in the
/// last unit.
const MAX_FRACTION_DIGITS: usize = 20;

/// Why a size is refused, in qemu's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("Invalid image size specified: '{0}'.")]
    Invalid(String),
    #[error("Invalid image size specified. Must be between 0 and {}.", i64::MAX)]
    OutOfRange,
    #[error(
        "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
    )]
    TooLarge,
}

/// The virtual size `text` asks for, rounded up to whole sectors.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid(text.to_string());
    let body = text.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let body = body.strip_prefix('+').unwrap_or(body);
    let bytes: u128 = if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X"))
    {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        let digits = hex.trim_start_matches('0');
        if digits.len() > 16 {
            return Err(SizeError::OutOfRange);
        }
        u128::from_str_radix(if digits.is_empty() { "0" } else { digits }, 16)
            .map_err(|_| invalid())?
    } else {
        let number_len = body
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(body.len());
        let (number, unit) = body.split_at(number_len);
        let (whole, fraction) = match number.split_once('.') {
            Some((w, f)) => (w, Some(f)),
            None => (number, None),
        };
        let has_digits = !whole.is_empty() || fraction.is_some_and(|f| !f.is_empty());
        if !has_digits || fraction.is_some_and(|f| f.contains('.')) {
            return Err(invalid());
        }
        let shift = match unit {
            "" => 0,
            "b" | "B" => 0,
            "k" | "K" => 10,
            "m" | "M" => 20,
            "g" | "G" => 30,
            "t" | "T" => 40,
            "p" | "P" => 50,
            "e" | "E" => 60,
            _ => return Err(invalid()),
        };
        if fraction.is_some() && shift == 0 {
            return Err(invalid());
        }
        let multiplier = 1u128 << shift;
        let whole_digits = whole.trim_start_matches('0');
        if whole_digits.len() > 19 {
            return Err(SizeError::OutOfRange);
        }
        let whole_value: u128 = if whole_digits.is_empty() {
            0
        } else {
            whole_digits.parse().map_err(|_| invalid())?
        };
        let mut bytes = whole_value * multiplier;
        if let Some(f) = fraction {
            let f = &f[..f.len().min(MAX_FRACTION_DIGITS)];
            if !f.is_empty() {
                let numerator: u128 = f.parse().map_err(|_| invalid())?;
                bytes += numerator * multiplier / 10u128.pow(f.len() as u32);
            }
        }
        bytes
    };
    if bytes > MAX_PARSED {
        return Err(SizeError::OutOfRange);
    }
    let size = align_up(bytes as u64, SECTOR_SIZE);
    if size > MAX_VIRTUAL_SIZE {
        return Err(SizeError::TooLarge);
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `qemu-img create` (10.0) made of each text, through pcocc 0.7.5's resize.
    #[test]
    fn sizes_qemu_accepts() {
        for (text, size) in [
            ("128M", 128u64 << 20),
            ("1G", 1 << 30),
            ("200000000", 200_000_000),
            ("1.5G", 1_610_612_736),
            ("100k", 102_400),
            ("512b", 512),
            ("3T", 3 << 40),
            ("10K", 10_240),
            ("0", 0),
            ("70m", 73_400_320),
            ("1000", 1024),
            ("1.3K", 1536),
            ("0x1000", 4096),
            ("+1G", 1 << 30),
            ("1P", 1 << 50),
            ("2P", 2 << 50),
            ("1.0000000001G", 1 << 30),
            ("07", 512),
            ("010k", 10_240),
            (" 5M", 5 << 20),
            (".5G", 512 << 20),
            ("5.G", 5 << 30),
        ] {
            assert_eq!(parse_size(text), Ok(size), "{text:?}");
        }
    }

    #[test]
    fn sizes_qemu_refuses() {
        for text in [
            "banana", "1e9", "", "100x", "1KiB", "0.5", "1.5", "2.5", "0x10M", "K", "1 G", "1kB",
            "5M ", "1.5b", "1_000", "-5M", ".", "1..5G", "0x",
        ] {
            assert_eq!(
                parse_size(text),
                Err(SizeError::Invalid(text.to_string())),
                "{text:?}"
            );
        }
        for text in ["9223372036854775808", "18446744073709551616", "8E", "17E"] {
            assert_eq!(parse_size(text), Err(SizeError::OutOfRange), "{text:?}");
        }
        for text in ["1E", "3P", "9007199254740992", "2251799813685249"] {
            assert_eq!(parse_size(text), Err(SizeError::TooLarge), "{text:?}");
        }
        assert_eq!(
            SizeError::Invalid("banana".into()).to_string(),
            "Invalid image size specified: 'banana'."
        );
    }
}
