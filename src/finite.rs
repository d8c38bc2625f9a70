//! The non-finite check of restored tensor data (opt-in): a NaN or an infinity in one restored
//! row reaches every sequence of a unified cache, because attention multiplies every cell's V
//! row, masked ones included, and `0 * NaN` is NaN. A valid f16 cache can hold an infinity
//! after an overflow, so the check is off by default (README, "Non-finite values").

use ggml_sys::{ggml_type, GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32};

/// The index of the first NaN or infinity among the elements `bytes` holds as `ty` (F32,
/// F16 or BF16, native byte order), or `None`: none there, a trailing partial element, or a
/// type this check does not read (the quantized ones).
pub fn first_non_finite(ty: ggml_type, bytes: &[u8]) -> Option<usize> {
    // An all-ones exponent is NaN or infinity; a whole chunk is tested before a scan for the
    // element, so the common (finite) case is one pass the compiler vectorizes.
    fn scan<const N: usize>(bytes: &[u8], exp: u32, load: fn([u8; N]) -> u32) -> Option<usize> {
        let bad = |c: &[u8]| load(c.try_into().unwrap()) & exp == exp;
        let mut base = 0;
        for chunk in bytes.chunks_exact(N * 64) {
            if chunk.chunks_exact(N).fold(false, |acc, c| acc | bad(c)) {
                return chunk.chunks_exact(N).position(bad).map(|i| base + i);
            }
            base += 64;
        }
        let tail = &bytes[bytes.len() / (N * 64) * (N * 64)..];
        tail.chunks_exact(N).position(bad).map(|i| base + i)
    }
    match ty {
        GGML_TYPE_F32 => scan::<4>(bytes, 0x7f80_0000, u32::from_ne_bytes),
        GGML_TYPE_F16 => scan::<2>(bytes, 0x7c00, |b| u16::from_ne_bytes(b) as u32),
        GGML_TYPE_BF16 => scan::<2>(bytes, 0x7f80, |b| u16::from_ne_bytes(b) as u32),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_nan_or_infinity_of_each_type() {
        let f32s: Vec<u8> = (0..1000)
            .flat_map(|i| (i as f32 * 0.5 - 100.0).to_ne_bytes())
            .collect();
        assert_eq!(first_non_finite(GGML_TYPE_F32, &f32s), None);
        for (at, v) in [
            (0, f32::NAN),
            (700, f32::INFINITY),
            (999, f32::NEG_INFINITY),
        ] {
            let mut b = f32s.clone();
            b[at * 4..at * 4 + 4].copy_from_slice(&v.to_ne_bytes());
            assert_eq!(first_non_finite(GGML_TYPE_F32, &b), Some(at), "f32 at {at}");
        }
        // f16: 0x3c00 is 1.0, 0x7bff the largest finite, 0x7c00 +inf, 0xfe00 a NaN
        let mut f16s: Vec<u8> = (0..300u16)
            .flat_map(|i| [0x3c00u16, 0x7bff, 0xfbff][i as usize % 3].to_ne_bytes())
            .collect();
        assert_eq!(first_non_finite(GGML_TYPE_F16, &f16s), None);
        f16s[2 * 201..2 * 202].copy_from_slice(&0xfe00u16.to_ne_bytes());
        f16s[2 * 250..2 * 251].copy_from_slice(&0x7c00u16.to_ne_bytes());
        assert_eq!(first_non_finite(GGML_TYPE_F16, &f16s), Some(201));
        // bf16: 0x3f80 is 1.0, 0x7f80 +inf
        let mut bf16s: Vec<u8> = (0..5).flat_map(|_| 0x3f80u16.to_ne_bytes()).collect();
        assert_eq!(first_non_finite(GGML_TYPE_BF16, &bf16s), None);
        bf16s[6..8].copy_from_slice(&0x7f80u16.to_ne_bytes());
        assert_eq!(first_non_finite(GGML_TYPE_BF16, &bf16s), Some(3));
        // quantized types are not read
        assert_eq!(first_non_finite(8, &[0xff; 64]), None);
    }
}
