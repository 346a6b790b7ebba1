//! Python's `float.__repr__` (what `json.dumps` writes for a float), reproduced exactly.
//!
//! Python writes the shortest digit string that reads back to the same double, in fixed
//! notation when `1e-4 <= |x| < 1e16` (with a trailing `.0` for integral values) and in
//! exponent notation otherwise, with a signed exponent of at least two digits (`1e-05`,
//! `1e+16`). `json.dumps` spells the non-finite values `NaN`, `Infinity` and `-Infinity`.
//!
//! Normal doubles with a nonzero significand field (nearly all values) take the fast path of
//! [`shortest`]; the others (zero, subnormals, powers of two, non-finite values) the general
//! path, zmij's text (Schubfach family, closest-to-exact shortest output, as Python's `dtoa`
//! mode 0) re-laid out where Python's layout differs. Both give the same digits.

use super::shortest::{self, ROOM};

/// The longest text [`write_float`] writes: `-2.2250738585072014e-308`.
pub const MAX_FLOAT_LEN: usize = 24;

/// Bytes of `out` that [`write_float`] may overwrite, at least [`MAX_FLOAT_LEN`].
pub const FLOAT_ROOM: usize = ROOM;

/// Write the JSON text `json.dumps` writes for `x` at the start of `out` (at least
/// [`FLOAT_ROOM`] bytes long; bytes after the text may be overwritten) and return its length.
#[inline]
pub fn write_float(x: f64, out: &mut [u8]) -> usize {
    let out: &mut [u8; ROOM] = (&mut out[..ROOM]).try_into().expect("the room was checked");
    let len = if is_normal_non_power_of_two(x) {
        shortest::write_normal(x, out)
    } else {
        write_general(x, out)
    };
    debug_assert!(len <= MAX_FLOAT_LEN);
    len
}

/// Whether `x` is normal with a nonzero significand field: what [`shortest`] writes.
#[inline(always)]
fn is_normal_non_power_of_two(x: f64) -> bool {
    x.is_normal() && x.to_bits() << 12 != 0
}

/// [`write_float`] by zmij, for any `x`.
#[inline(never)]
fn write_general(x: f64, out: &mut [u8]) -> usize {
    if !x.is_finite() {
        return copy_short(out, non_finite(x));
    }
    let mut buffer = zmij::Buffer::new();
    let text = buffer.format_finite(x).as_bytes();
    let magnitude = x.abs();
    // `1e-4` is the double nearest to 10^-4; every double at or above it has shortest digits
    // >= 10^-4, so zmij's fixed/exponent choice (exponent from 10^16 up) matches Python's.
    if magnitude >= 1e-4 || magnitude == 0.0 {
        copy_short(out, text)
    } else {
        write_small(out, text)
    }
}

/// Copy `text` (at most 32 bytes) to the start of `out` with a few fixed-size moves instead
/// of a variable-length `memcpy` call; returns `text.len()`.
#[inline(always)]
pub fn copy_short(out: &mut [u8], text: &[u8]) -> usize {
    let len = text.len();
    debug_assert!(len <= 32);
    if len >= 16 {
        out[..16].copy_from_slice(&text[..16]);
        out[len - 16..len].copy_from_slice(&text[len - 16..]);
    } else if len >= 8 {
        out[..8].copy_from_slice(&text[..8]);
        out[len - 8..len].copy_from_slice(&text[len - 8..]);
    } else {
        out[..len].copy_from_slice(text);
    }
    len
}

/// The text of a non-finite float, as `json.dumps` writes it.
#[cold]
fn non_finite(x: f64) -> &'static [u8] {
    if x.is_nan() {
        b"NaN"
    } else if x > 0.0 {
        b"Infinity"
    } else {
        b"-Infinity"
    }
}

/// Re-lay out zmij's text for `0 < |x| < 1e-4` into Python's exponent form.
///
/// zmij writes these as `0.0000ddd` (for `1e-5 <= |x| < 1e-4`) or `d.ddde-N`; Python always
/// uses `d.ddde-NN` here.
#[cold]
fn write_small(out: &mut [u8], text: &[u8]) -> usize {
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        out[len..len + bytes.len()].copy_from_slice(bytes);
        len += bytes.len();
    };
    let body = match text.split_first() {
        Some((b'-', rest)) => {
            put(b"-");
            rest
        }
        _ => text,
    };
    let mut exponent_buffer = itoa::Buffer::new();
    let exponent = if let Some(fraction) = body.strip_prefix(b"0.") {
        let zeros = fraction.iter().take_while(|&&b| b == b'0').count();
        let digits = &fraction[zeros..];
        put(&digits[..1]);
        if digits.len() > 1 {
            put(b".");
            put(&digits[1..]);
        }
        exponent_buffer.format(zeros + 1).as_bytes()
    } else {
        let e = body
            .iter()
            .position(|&b| b == b'e')
            .expect("zmij writes an exponent for values below 1e-5");
        put(&body[..e]);
        // zmij writes `e-7`; the digits follow the `e-`.
        &body[e + 2..]
    };
    put(b"e-");
    if exponent.len() < 2 {
        put(b"0");
    }
    put(exponent);
    len
}

/// `repr(x)` as a `String`, for error messages (`repr` spells non-finite values `nan`, `inf`).
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    let mut out = [0; FLOAT_ROOM];
    let len = write_float(x, &mut out);
    String::from_utf8_lossy(&out[..len]).into_owned()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The next number of a xorshift stream (`state` nonzero).
    pub(in crate::hash) fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    fn json(x: f64) -> String {
        let mut out = [0; FLOAT_ROOM];
        let len = write_float(x, &mut out);
        String::from_utf8(out[..len].to_vec()).unwrap()
    }

    #[test]
    fn short_copies_of_every_length() {
        let text = b"0123456789abcdefghijklmnopqrstuv";
        for len in 0..=32 {
            let mut out = [b'_'; 40];
            assert_eq!(copy_short(&mut out, &text[..len]), len);
            assert_eq!(&out[..len], &text[..len]);
            assert!(out[len..].iter().all(|&b| b == b'_'));
        }
    }

    #[test]
    fn matches_python_repr_on_known_values() {
        let cases: &[(f64, &str)] = &[
            (0.1, "0.1"),
            (1e-05, "1e-05"),
            (0.0001, "0.0001"),
            (0.00012345, "0.00012345"),
            (1.2345e-5, "1.2345e-05"),
            (-1.2345e-5, "-1.2345e-05"),
            (1e-7, "1e-07"),
            (1.5e-10, "1.5e-10"),
            (1e16, "1e+16"),
            (9999999999999998.0, "9999999999999998.0"),
            (1e15, "1000000000000000.0"),
            (5e-324, "5e-324"),
            (-5e-324, "-5e-324"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (-2.5, "-2.5"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (2.2250738585072014e-308, "2.2250738585072014e-308"),
            (123456789.0, "123456789.0"),
            (1.5e300, "1.5e+300"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
            (0.30000000000000004, "0.30000000000000004"),
            // The exact value ends in ...240.25: a tie, which Python breaks to the even digit.
            (1823352145355240.2, "1823352145355240.2"),
            (f64::from(0.1f32), "0.10000000149011612"),
        ];
        for &(value, expected) in cases {
            assert_eq!(json(value), expected, "value {value:e}");
        }
    }

    #[test]
    fn neighbours_of_the_notation_boundaries() {
        let below_1e4 = f64::from_bits(1e-4f64.to_bits() - 1);
        assert_eq!(json(below_1e4), "9.999999999999999e-05");
        let below_1e16 = f64::from_bits(1e16f64.to_bits() - 1);
        assert_eq!(json(below_1e16), "9999999999999998.0");
        let above_1e16 = f64::from_bits(1e16f64.to_bits() + 1);
        assert_eq!(json(above_1e16), "1.0000000000000002e+16");
        let below_1e5 = f64::from_bits(1e-5f64.to_bits() - 1);
        assert_eq!(json(below_1e5), "9.999999999999999e-06");
    }

    #[test]
    fn repr_spells_non_finite_like_python() {
        assert_eq!(float_repr(f64::NAN), "nan");
        assert_eq!(float_repr(f64::NEG_INFINITY), "-inf");
        assert_eq!(float_repr(-1.5), "-1.5");
    }

    /// Split Python-style text into (negative, digits without dot, decimal exponent of the
    /// first digit).
    fn decompose(text: &str) -> (bool, String, i32) {
        let (negative, body) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match body.split_once(['e', 'E']) {
            Some((m, e)) => (m, e.parse::<i32>().unwrap()),
            None => (body, 0),
        };
        let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let all = format!("{int_part}{frac_part}");
        let leading = all.bytes().take_while(|&b| b == b'0').count();
        let digits = all[leading..].trim_end_matches('0').to_owned();
        let point = int_part.len() as i32 - leading as i32 - 1 + exponent;
        (negative, digits, point)
    }

    /// Check the layout rules, the round trip, and that the digits are Rust's own shortest
    /// round-trip digits, except on exact ties, where Python (like zmij) picks the even digit
    /// and Rust's formatter may pick the odd one.
    fn check(x: f64) {
        let text = json(x);
        assert_eq!(
            text.parse::<f64>().unwrap().to_bits(),
            x.to_bits(),
            "{text}"
        );
        let (negative, digits, point) = decompose(&text);
        let (std_negative, std_digits, std_point) = decompose(&format!("{x:e}"));
        assert_eq!(
            (negative, digits.len(), point),
            (std_negative, std_digits.len(), std_point)
        );
        if digits != std_digits {
            let (ours, theirs) = (digits.as_bytes(), std_digits.as_bytes());
            let last = ours.len() - 1;
            assert_eq!(ours[..last], theirs[..last], "{text}");
            assert_eq!(ours[last].abs_diff(theirs[last]), 1, "{text}");
            assert_eq!(ours[last] % 2, 0, "{text}: ties go to the even digit");
        }
        let fixed = (-4..16).contains(&point);
        assert_eq!(!text.contains('e'), fixed, "{text}");
        if fixed {
            assert!(text.contains('.'), "{text}");
        } else {
            let exponent = text.split_once('e').unwrap().1;
            assert!(
                exponent.starts_with(['+', '-']) && exponent.len() >= 3,
                "{text}"
            );
        }
    }

    #[test]
    fn random_doubles_round_trip_with_shortest_digits() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..200_000 {
            xorshift(&mut state);
            let x = f64::from_bits(state);
            if x.is_finite() {
                check(x);
            }
            // Also values of gradient-like magnitudes around the notation boundaries.
            let scale = [1e-5, 1e-4, 1e15, 1e16, 1.0][(state % 5) as usize];
            check(scale * (state >> 11) as f64 / (1u64 << 53) as f64);
        }
    }

    /// Compare the fast path with the general path on `x` (when `x` takes the fast path).
    fn fast_path_agrees(x: f64) {
        if is_normal_non_power_of_two(x) {
            let (mut fast, mut general) = ([0; FLOAT_ROOM], [0; FLOAT_ROOM]);
            let len = shortest::write_normal(x, &mut fast);
            let expected = write_general(x, &mut general);
            assert_eq!(
                std::str::from_utf8(&fast[..len]).unwrap(),
                std::str::from_utf8(&general[..expected]).unwrap(),
                "bits {:#x}",
                x.to_bits()
            );
        }
    }

    #[test]
    fn fast_path_writes_what_the_general_path_writes() {
        let mut state: u64 = 0x0123_4567_89AB_CDEF;
        for _ in 0..300_000 {
            let bits = xorshift(&mut state);
            // Any double, a float32 widened, gradient-like magnitudes, few-digit decimals.
            fast_path_agrees(f64::from_bits(bits));
            fast_path_agrees(f64::from(f32::from_bits(bits as u32)));
            let unit = (bits >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            fast_path_agrees(unit * 10f64.powi((bits % 40) as i32 - 20));
            fast_path_agrees((bits % 100_000) as f64 / 10f64.powi((bits >> 40) as i32 % 23));
        }
        // Every power of ten, its neighbours, and the boundaries between layouts and lengths.
        for exponent in -323..=308 {
            let power: f64 = format!("1e{exponent}").parse().unwrap();
            for x in [power, 2.5 * power, 9.5 * power, 1.2345678901234567 * power] {
                for step in -3i64..=3 {
                    let bits = x.to_bits().wrapping_add_signed(step);
                    fast_path_agrees(f64::from_bits(bits));
                    fast_path_agrees(-f64::from_bits(bits));
                }
            }
        }
        for integer in (1u64..=1 << 16).chain((1 << 53) - 5..(1 << 53) + 5) {
            fast_path_agrees(integer as f64);
        }
        fast_path_agrees(f64::MAX);
        fast_path_agrees(f64::MIN_POSITIVE * 1.5);
    }
}
