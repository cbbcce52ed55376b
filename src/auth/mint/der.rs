//! Just enough DER to take an RSA private key apart: aws-lc-rs exports RSA keys only as
//! PKCS#8, and a JWK wants the PKCS#1 integers inside it.
//!
//! Strict by design (this only ever reads what aws-lc-rs wrote): definite, minimally encoded
//! lengths; no trailing bytes; positive integers.

/// Why DER could not be read. Carries no input bytes: the input is private key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DerError {
    #[error("truncated DER")]
    Truncated,
    #[error("unexpected DER tag")]
    UnexpectedTag,
    #[error("DER length is not minimally encoded or is indefinite")]
    BadLength,
    #[error("trailing bytes after DER value")]
    TrailingBytes,
    #[error("DER integer is empty, negative or not minimally encoded")]
    BadInteger,
    #[error("unsupported RSA private key (not a two-prime PKCS#1 v1 key)")]
    UnsupportedKey,
}

pub(crate) const TAG_INTEGER: u8 = 0x02;
pub(crate) const TAG_OCTET_STRING: u8 = 0x04;
pub(crate) const TAG_SEQUENCE: u8 = 0x30;

/// Reads DER values one after another from a byte slice.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DerError> {
        if self.rest.len() < n {
            return Err(DerError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn length(&mut self) -> Result<usize, DerError> {
        let first = self.take(1)?[0];
        if first < 0x80 {
            return Ok(usize::from(first));
        }
        // 0x80 is BER's indefinite length; more than 4 length bytes is no key we would read.
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return Err(DerError::BadLength);
        }
        let bytes = self.take(count)?;
        if bytes[0] == 0 {
            return Err(DerError::BadLength);
        }
        let length = bytes
            .iter()
            .fold(0usize, |acc, byte| (acc << 8) | usize::from(*byte));
        if length < 0x80 {
            return Err(DerError::BadLength);
        }
        Ok(length)
    }

    /// The contents of the next value, which must have `tag`.
    pub(crate) fn read(&mut self, tag: u8) -> Result<&'a [u8], DerError> {
        if self.take(1)?[0] != tag {
            return Err(DerError::UnexpectedTag);
        }
        let length = self.length()?;
        self.take(length)
    }

    /// The contents of the next SEQUENCE, as a reader of its own.
    pub(crate) fn sequence(&mut self) -> Result<Reader<'a>, DerError> {
        self.read(TAG_SEQUENCE).map(Reader::new)
    }

    /// The next INTEGER, which must be non-negative, as minimal big-endian bytes
    /// (the leading zero that keeps a DER integer positive removed; zero is `[]`).
    pub(crate) fn unsigned(&mut self) -> Result<&'a [u8], DerError> {
        let bytes = self.read(TAG_INTEGER)?;
        match bytes {
            [] => Err(DerError::BadInteger),
            [first, ..] if first & 0x80 != 0 => Err(DerError::BadInteger),
            [0] => Ok(&[]),
            [0, second, ..] if second & 0x80 == 0 => Err(DerError::BadInteger),
            [0, tail @ ..] => Ok(tail),
            _ => Ok(bytes),
        }
    }

    /// Ok when every byte was read.
    pub(crate) fn finish(self) -> Result<(), DerError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DerError::TrailingBytes)
        }
    }
}

/// The integers of a two-prime RSA private key, minimal big-endian.
pub(crate) struct RsaPrivateParts<'a> {
    pub n: &'a [u8],
    pub e: &'a [u8],
    pub d: &'a [u8],
    pub p: &'a [u8],
    pub q: &'a [u8],
    pub dp: &'a [u8],
    pub dq: &'a [u8],
    pub qi: &'a [u8],
}

/// Reads a PKCS#8 v1 `PrivateKeyInfo` holding an RSA key (RFC 5208, RFC 8017 A.1.2):
/// `SEQUENCE { INTEGER 0, AlgorithmIdentifier, OCTET STRING { RSAPrivateKey } }` where
/// `RSAPrivateKey ::= SEQUENCE { version 0, n, e, d, p, q, dP, dQ, qInv }`.
pub(crate) fn rsa_private_key_from_pkcs8(pkcs8: &[u8]) -> Result<RsaPrivateParts<'_>, DerError> {
    let mut outer = Reader::new(pkcs8);
    let mut info = outer.sequence()?;
    outer.finish()?;
    if !info.unsigned()?.is_empty() {
        return Err(DerError::UnsupportedKey);
    }
    // The algorithm identifier is rsaEncryption; aws-lc-rs wrote it for an RSA key pair.
    info.sequence()?;
    let mut private_key = Reader::new(info.read(TAG_OCTET_STRING)?);
    // PKCS#8 v1 may end with optional attributes; aws-lc-rs writes none, and we accept none.
    info.finish()?;
    let mut rsa = private_key.sequence()?;
    private_key.finish()?;
    // Version 1 would mean a multi-prime key, which a JWK's n..qi cannot hold in full.
    if !rsa.unsigned()?.is_empty() {
        return Err(DerError::UnsupportedKey);
    }
    let parts = RsaPrivateParts {
        n: rsa.unsigned()?,
        e: rsa.unsigned()?,
        d: rsa.unsigned()?,
        p: rsa.unsigned()?,
        q: rsa.unsigned()?,
        dp: rsa.unsigned()?,
        dq: rsa.unsigned()?,
        qi: rsa.unsigned()?,
    };
    rsa.finish()?;
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_lengths() {
        let mut short = Reader::new(&[0x04, 0x02, 0xaa, 0xbb]);
        assert_eq!(short.read(TAG_OCTET_STRING), Ok(&[0xaa, 0xbb][..]));
        short.finish().unwrap();

        let mut long = vec![0x04, 0x81, 0x80];
        long.extend([7u8; 0x80]);
        let mut reader = Reader::new(&long);
        assert_eq!(reader.read(TAG_OCTET_STRING).unwrap().len(), 0x80);
        reader.finish().unwrap();

        let mut two = vec![0x04, 0x82, 0x01, 0x00];
        two.extend([7u8; 0x100]);
        assert_eq!(
            Reader::new(&two).read(TAG_OCTET_STRING).unwrap().len(),
            0x100
        );
    }

    #[test]
    fn lengths_that_are_not_der_are_refused() {
        for bytes in [
            &[0x04, 0x80, 0x00, 0x00][..],      // indefinite
            &[0x04, 0x81, 0x05, 1, 2, 3, 4, 5], // long form for a short length
            &[0x04, 0x82, 0x00, 0x80],          // leading zero length byte
            &[0x04, 0x85, 1, 1, 1, 1, 1],       // five length bytes
        ] {
            assert_eq!(
                Reader::new(bytes).read(TAG_OCTET_STRING),
                Err(DerError::BadLength),
                "{bytes:02x?}"
            );
        }
        assert_eq!(
            Reader::new(&[0x04, 0x03, 1, 2]).read(TAG_OCTET_STRING),
            Err(DerError::Truncated)
        );
        assert_eq!(
            Reader::new(&[0x04, 0x82, 0x01]).read(TAG_OCTET_STRING),
            Err(DerError::Truncated)
        );
        assert_eq!(
            Reader::new(&[0x02, 0x01, 0x00]).read(TAG_OCTET_STRING),
            Err(DerError::UnexpectedTag)
        );
        assert_eq!(Reader::new(&[]).read(TAG_INTEGER), Err(DerError::Truncated));
    }

    #[test]
    fn integers_lose_their_sign_byte_and_negatives_are_refused() {
        fn unsigned(bytes: &[u8]) -> Result<&[u8], DerError> {
            Reader::new(bytes).unsigned()
        }
        assert_eq!(unsigned(&[0x02, 0x01, 0x00]), Ok(&[][..]));
        assert_eq!(unsigned(&[0x02, 0x01, 0x7f]), Ok(&[0x7f][..]));
        assert_eq!(unsigned(&[0x02, 0x02, 0x00, 0x80]), Ok(&[0x80][..]));
        assert_eq!(
            unsigned(&[0x02, 0x03, 0x01, 0x00, 0x01]),
            Ok(&[0x01, 0x00, 0x01][..])
        );
        assert_eq!(unsigned(&[0x02, 0x01, 0x80]), Err(DerError::BadInteger));
        assert_eq!(
            unsigned(&[0x02, 0x02, 0x00, 0x7f]),
            Err(DerError::BadInteger)
        );
        assert_eq!(unsigned(&[0x02, 0x00]), Err(DerError::BadInteger));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut reader = Reader::new(&[0x02, 0x01, 0x01, 0x00]);
        reader.unsigned().unwrap();
        assert_eq!(reader.finish(), Err(DerError::TrailingBytes));
    }

    /// Wraps `contents` in a tag and a DER length.
    fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match contents.len() {
            n if n < 0x80 => out.push(n as u8),
            n if n <= 0xff => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(contents);
        out
    }

    fn pkcs8(version: u8, rsa_version: u8) -> Vec<u8> {
        let mut rsa = tlv(TAG_INTEGER, &[rsa_version]);
        for value in [0x11u8, 0x03, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77] {
            rsa.extend(tlv(TAG_INTEGER, &[value]));
        }
        let algorithm = tlv(TAG_SEQUENCE, &[0x06, 0x01, 0x2a, 0x05, 0x00]);
        let mut info = tlv(TAG_INTEGER, &[version]);
        info.extend(algorithm);
        info.extend(tlv(TAG_OCTET_STRING, &tlv(TAG_SEQUENCE, &rsa)));
        tlv(TAG_SEQUENCE, &info)
    }

    #[test]
    fn a_pkcs8_rsa_key_gives_its_integers_in_order() {
        let der = pkcs8(0, 0);
        let parts = rsa_private_key_from_pkcs8(&der).unwrap();
        let got = [
            parts.n, parts.e, parts.d, parts.p, parts.q, parts.dp, parts.dq, parts.qi,
        ];
        let want: [&[u8]; 8] = [
            &[0x11],
            &[0x03],
            &[0x22],
            &[0x33],
            &[0x44],
            &[0x55],
            &[0x66],
            &[0x77],
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn multi_prime_and_unknown_versions_are_refused() {
        assert!(matches!(
            rsa_private_key_from_pkcs8(&pkcs8(0, 1)),
            Err(DerError::UnsupportedKey)
        ));
        assert!(matches!(
            rsa_private_key_from_pkcs8(&pkcs8(1, 0)),
            Err(DerError::UnsupportedKey)
        ));
        let mut trailing = pkcs8(0, 0);
        trailing.push(0);
        assert!(matches!(
            rsa_private_key_from_pkcs8(&trailing),
            Err(DerError::TrailingBytes)
        ));
    }
}
