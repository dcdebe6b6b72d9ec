use md5::{Digest, Md5};

/// The content hash that versions a config file: lowercase hex md5 of its bytes.
///
/// It detects change and divergence between nodes; it is not a security boundary (the files
/// come from the operators' own deploy tooling).
pub fn content_hash(bytes: &[u8]) -> String {
    let digest = Md5::digest(bytes);
    let mut out = String::with_capacity(32);
    for b in digest {
        out.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        out.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn md5_hex_of_known_input() {
        assert_eq!(super::content_hash(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(super::content_hash(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
    }
}
