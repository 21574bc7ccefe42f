//! Padding of plaintexts to fixed-size buckets before encryption, so the
//! server sees message sizes only coarsely. ISO/IEC 7816-4 style: one `0x80`
//! byte then zeros up to the next multiple of [`PADDING_BUCKET`].

/// Bucket size in bytes; every padded plaintext is a non-zero multiple of it.
pub const PADDING_BUCKET: usize = 256;

/// Largest plaintext of one 1:1 or group message: 64 KiB. Larger content
/// (files) goes through STREAM instead; with padding the encrypted body stays
/// within one frame.
pub const MAX_PLAINTEXT_LEN: usize = 64 * 1024;

/// Appends the padding to `buf` (which holds the plaintext).
pub(crate) fn pad_in_place(buf: &mut Vec<u8>, start: usize) {
    let len = buf.len() - start;
    let padded = (len / PADDING_BUCKET + 1) * PADDING_BUCKET;
    buf.push(0x80);
    buf.resize(start + padded, 0);
}

/// Length of the plaintext inside a padded buffer, or `None` if the padding is malformed.
pub(crate) fn unpadded_len(padded: &[u8]) -> Option<usize> {
    if padded.is_empty() || !padded.len().is_multiple_of(PADDING_BUCKET) {
        return None;
    }
    let marker = padded.iter().rposition(|b| *b != 0)?;
    (padded[marker] == 0x80).then_some(marker)
}

/// The padded length for a plaintext of `len` bytes.
pub const fn padded_len(len: usize) -> usize {
    (len / PADDING_BUCKET + 1) * PADDING_BUCKET
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_buckets_and_back() {
        for len in [0usize, 1, 255, 256, 257, 1000] {
            let mut buf = vec![7u8; 3];
            buf.extend(std::iter::repeat_n(0xAA, len));
            pad_in_place(&mut buf, 3);
            let body = &buf[3..];
            assert_eq!(body.len(), padded_len(len));
            assert_eq!(body.len() % PADDING_BUCKET, 0);
            assert_eq!(unpadded_len(body), Some(len));
        }
        assert_eq!(unpadded_len(&[0u8; 256]), None);
        assert_eq!(unpadded_len(&[1u8; 256]), None);
        assert_eq!(unpadded_len(&[0x80u8; 255]), None);
    }
}
