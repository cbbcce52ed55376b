//! `edgegate keys generate`: a new JWT signing key, as the Supabase dashboard imports it.

use std::io::Write;

use secrecy::ExposeSecret as _;

use crate::auth::Alg;
use crate::auth::mint::SigningKey;

/// What `keys generate` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOutput {
    /// The private JWK (one line).
    Private,
    /// The public JWKS `{"keys":[…]}` (one line).
    Public,
    /// The private JWK, then the public JWKS: two lines.
    Both,
}

/// Generates a key and writes the lines `output` asks for to `out` (stdout: the private key
/// goes nowhere else).
pub fn generate(alg: Alg, output: KeyOutput, out: &mut impl Write) -> anyhow::Result<()> {
    let key = SigningKey::generate(alg)?;
    if matches!(output, KeyOutput::Private | KeyOutput::Both) {
        let private = key.private_jwk()?;
        writeln!(out, "{}", private.expose_secret())?;
    }
    if matches!(output, KeyOutput::Public | KeyOutput::Both) {
        writeln!(out, "{}", key.public_jwks())?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn lines(alg: Alg, output: KeyOutput) -> Vec<Value> {
        let mut out = Vec::new();
        generate(alg, output, &mut out).unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    #[test]
    fn both_prints_the_private_jwk_then_its_public_jwks() {
        let printed = lines(Alg::ES256, KeyOutput::Both);
        assert_eq!(printed.len(), 2);
        let (private, jwks) = (&printed[0], &printed[1]);
        assert!(private["d"].is_string());
        let key = SigningKey::from_private_jwk(private).unwrap();
        assert_eq!(jwks, &key.public_jwks());
    }

    #[test]
    fn private_and_public_print_one_line_each() {
        let private = lines(Alg::EdDSA, KeyOutput::Private);
        assert_eq!(private.len(), 1);
        assert_eq!(private[0]["key_ops"], serde_json::json!(["sign", "verify"]));
        let public = lines(Alg::EdDSA, KeyOutput::Public);
        assert_eq!(public.len(), 1);
        assert!(public[0]["keys"][0]["d"].is_null());
        assert_eq!(public[0]["keys"][0]["alg"], "EdDSA");
    }
}
