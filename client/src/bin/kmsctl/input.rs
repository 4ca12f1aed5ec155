//! Reading command input from stdin with a size limit, raw or base64.
//!
//! Input is bounded before it is sent: reading stops one byte past the
//! limit, so a huge stdin fails with a clear message instead of being
//! buffered and refused by the daemon.

use std::io::Read;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::error::CliError;

/// Reads all of `r`, failing if it holds more than `limit` bytes. `what`
/// names the input in the error.
///
/// # Errors
/// [`CliError::Input`] when over the limit, [`CliError::Stdio`] on read
/// errors.
pub fn read_limited(r: impl Read, limit: usize, what: &str) -> Result<Zeroizing<Vec<u8>>, CliError> {
    let mut buf = Zeroizing::new(Vec::new());
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    r.take(cap).read_to_end(&mut buf).map_err(|source| CliError::Stdio {
        what: "read stdin",
        source,
    })?;
    if buf.len() > limit {
        return Err(CliError::Input(format!("{what} on stdin is larger than {limit} bytes")));
    }
    Ok(buf)
}

/// Like [`read_limited`], reading base64 text (whitespace ignored) that
/// decodes to at most `limit` bytes.
///
/// # Errors
/// As [`read_limited`], and [`CliError::Input`] for invalid base64.
pub fn read_base64(r: impl Read, limit: usize, what: &str) -> Result<Zeroizing<Vec<u8>>, CliError> {
    // 4 characters per 3 bytes, plus room for line breaks.
    let text_limit = limit.div_ceil(3) * 4 * 2 + 64;
    let text = read_limited(r, text_limit, what)?;
    let compact: Zeroizing<Vec<u8>> =
        Zeroizing::new(text.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect());
    let decoded = STANDARD
        .decode(compact.as_slice())
        .map(Zeroizing::new)
        .map_err(|e| CliError::Input(format!("{what} on stdin is not valid base64: {e}")))?;
    if decoded.len() > limit {
        return Err(CliError::Input(format!("{what} is larger than {limit} bytes")));
    }
    Ok(decoded)
}

/// Reads `what` from `r`, raw or as base64.
///
/// # Errors
/// As [`read_limited`] and [`read_base64`].
pub fn read_input(r: impl Read, base64: bool, limit: usize, what: &str) -> Result<Zeroizing<Vec<u8>>, CliError> {
    if base64 {
        read_base64(r, limit, what)
    } else {
        read_limited(r, limit, what)
    }
}

/// `bytes` for stdout: raw, or base64 text with a newline.
pub fn encode_output(bytes: &[u8], base64: bool) -> Zeroizing<Vec<u8>> {
    if !base64 {
        return Zeroizing::new(bytes.to_vec());
    }
    let mut text = Zeroizing::new(Vec::with_capacity(bytes.len().div_ceil(3) * 4 + 1));
    text.resize(bytes.len().div_ceil(3) * 4, 0);
    // The buffer is exactly the encoded length, so this cannot fail.
    let written = STANDARD.encode_slice(bytes, &mut text).unwrap_or(0);
    text.truncate(written);
    text.push(b'\n');
    text
}

/// Base64 text in zeroizing memory.
pub fn b64(bytes: &[u8]) -> Zeroizing<String> {
    Zeroizing::new(STANDARD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_at_the_limit_is_accepted_and_over_is_refused() {
        let data = [7u8; 16];
        assert_eq!(read_limited(&data[..], 16, "x").unwrap().len(), 16);
        let err = read_limited(&data[..], 15, "plaintext").unwrap_err();
        assert!(matches!(err, CliError::Input(ref m) if m.contains("plaintext") && m.contains("15")));
    }

    #[test]
    fn base64_round_trips_with_line_breaks() {
        let text = encode_output(b"hello world", true);
        assert_eq!(text.as_slice(), b"aGVsbG8gd29ybGQ=\n");
        let wrapped = b"aGVsbG8g\nd29ybGQ=\n";
        assert_eq!(read_base64(&wrapped[..], 64, "x").unwrap().as_slice(), b"hello world");
        assert!(matches!(read_base64(&b"***"[..], 64, "x"), Err(CliError::Input(_))));
        assert!(matches!(read_base64(&wrapped[..], 4, "x"), Err(CliError::Input(_))));
    }

    #[test]
    fn raw_output_is_unchanged() {
        assert_eq!(encode_output(&[0, 255], false).as_slice(), &[0, 255]);
    }
}
