//! Cosign-compatible signatures of plugins in OCI registries, verified with offline keys.
//!
//! Cosign stores the signature of the manifest `sha256:<hex>` in the same repository under
//! the tag `sha256-<hex>.sig`: an image whose layers are "simple signing" payloads (JSON
//! naming the signed manifest digest), each with its ECDSA P-256 / SHA-256 signature (DER,
//! base64) in the annotation `dev.cosignproject.cosign/signature`. `cosign sign --key` writes
//! exactly this, and `cosign verify --key` accepts what [`sign`] writes: the keys are PEM
//! (public: SubjectPublicKeyInfo as `cosign public-key` prints it; private: PKCS#8, for
//! `celery-operator plugin sign`). The cryptography is RustCrypto's `p256`; keyless signing
//! (Fulcio, Rekor) is not supported.

use std::path::Path;

use base64::Engine as _;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{DerSignature, Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey};
use serde_json::{Value, json};

/// Media type of a signature layer.
pub const PAYLOAD_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Layer annotation holding the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The payload's `critical.type`.
const PAYLOAD_TYPE: &str = "cosign container image signature";
/// Largest payload read (cosign's are a few hundred bytes).
pub const MAX_PAYLOAD_BYTES: usize = 64 << 10;
/// Signature layers examined per plugin, at most.
pub const MAX_SIGNATURES: usize = 16;

/// The tag under which cosign stores the signatures of `manifest_digest`.
pub fn signature_tag(manifest_digest: &str) -> String {
    format!("{}.sig", manifest_digest.replacen(':', "-", 1))
}

/// The simple-signing payload cosign signs for a manifest of `repository` (as
/// `registry/path`).
pub fn payload(repository: &str, manifest_digest: &str) -> Vec<u8> {
    json!({
        "critical": {
            "identity": {"docker-reference": repository},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": PAYLOAD_TYPE,
        },
        "optional": null,
    })
    .to_string()
    .into_bytes()
}

/// The signature of `payload` with `key`, as cosign stores it (base64 of DER).
pub fn sign(key: &SigningKey, payload: &[u8]) -> String {
    let signature: DerSignature = key.sign(payload);
    base64::engine::general_purpose::STANDARD.encode(signature.as_bytes())
}

/// Reads a PKCS#8 PEM private key (P-256).
pub fn signing_key(path: &Path) -> Result<SigningKey, String> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
        format!(
            "{} is not a PKCS#8 PEM P-256 private key ({e}); make one with \
             `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`",
            path.display()
        )
    })
}

/// The public keys plugins must be signed with, each with a name (its file) for messages.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: Vec<(String, VerifyingKey)>,
}

impl TrustedKeys {
    /// Keys from PEM files (SubjectPublicKeyInfo, P-256), or from every file of a directory
    /// (a mounted ConfigMap: its hidden entries are skipped).
    pub fn from_files(paths: &[impl AsRef<Path>]) -> Result<Self, String> {
        let mut keys = TrustedKeys::default();
        for path in paths {
            let path = path.as_ref();
            let files = match path.is_dir() {
                false => vec![path.to_path_buf()],
                true => {
                    let mut files: Vec<_> = std::fs::read_dir(path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                        .filter_map(|e| e.ok())
                        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                        .map(|e| e.path())
                        .collect();
                    files.sort();
                    files
                }
            };
            for file in files {
                let pem = std::fs::read_to_string(&file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                keys.add(&file.display().to_string(), &pem)?;
            }
        }
        Ok(keys)
    }

    /// Adds the PEM public key `pem`, known as `name`.
    pub fn add(&mut self, name: &str, pem: &str) -> Result<(), String> {
        let key = VerifyingKey::from_public_key_pem(pem)
            .map_err(|e| format!("{name} is not a PEM P-256 public key: {e}"))?;
        self.keys.push((name.to_string(), key));
        Ok(())
    }

    /// Whether no key is trusted (signatures are then not required).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The name of the trusted key that signed `manifest_digest`, given the signature layers
    /// found (payload, base64 signature); or why none did.
    pub fn verify(
        &self,
        manifest_digest: &str,
        layers: &[(Vec<u8>, String)],
    ) -> Result<String, String> {
        if layers.is_empty() {
            return Err(format!("{manifest_digest} is not signed"));
        }
        let mut why = Vec::new();
        for (payload, signature) in layers.iter().take(MAX_SIGNATURES) {
            if let Err(e) = check_payload(payload, manifest_digest) {
                why.push(e);
                continue;
            }
            let Some(signature) = decode_signature(signature) else {
                why.push("a signature is not base64 DER ECDSA".to_string());
                continue;
            };
            match self
                .keys
                .iter()
                .find(|(_, key)| key.verify(payload, &signature).is_ok())
            {
                Some((name, _)) => return Ok(name.clone()),
                None => why.push("signed, but not by a trusted key".to_string()),
            }
        }
        why.dedup();
        Err(format!(
            "no valid signature of {manifest_digest} by a trusted key: {}",
            why.join("; ")
        ))
    }
}

fn decode_signature(text: &str) -> Option<Signature> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?;
    Signature::from_der(&der).ok()
}

/// The payload must be a cosign payload for exactly this manifest.
fn check_payload(payload: &[u8], manifest_digest: &str) -> Result<(), String> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err("a signature payload is too large".into());
    }
    let value: Value = serde_json::from_slice(payload)
        .map_err(|_| "a signature payload is not JSON".to_string())?;
    let critical = &value["critical"];
    if critical["type"] != PAYLOAD_TYPE {
        return Err("a signature payload is not a cosign image signature".into());
    }
    if critical["image"]["docker-manifest-digest"] != manifest_digest {
        return Err("a signature is for another manifest".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:4b0c5e0a9f3a7d1e2c6b8a9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b";

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn trusting(key: &SigningKey) -> TrustedKeys {
        use p256::pkcs8::{EncodePublicKey, LineEnding};
        let pem = key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        let mut keys = TrustedKeys::default();
        keys.add("ops.pub", &pem).unwrap();
        keys
    }

    #[test]
    fn a_signature_by_a_trusted_key_for_this_digest_verifies() {
        let signer = key(7);
        let payload = payload("127.0.0.1:5000/plugins/scaler", DIGEST);
        let layers = vec![(payload.clone(), sign(&signer, &payload))];
        assert_eq!(
            trusting(&signer).verify(DIGEST, &layers),
            Ok("ops.pub".into())
        );
    }

    #[test]
    fn unsigned_foreign_and_misdirected_signatures_are_refused() {
        let trusted = trusting(&key(7));
        assert!(
            trusted
                .verify(DIGEST, &[])
                .unwrap_err()
                .contains("is not signed")
        );

        let payload = payload("r/p", DIGEST);
        let foreign = vec![(payload.clone(), sign(&key(8), &payload))];
        let error = trusted.verify(DIGEST, &foreign).unwrap_err();
        assert!(error.contains("not by a trusted key"), "{error}");

        // A valid signature of another manifest does not sign this one.
        let other = payload_for_other();
        let misdirected = vec![(other.clone(), sign(&key(7), &other))];
        let error = trusted.verify(DIGEST, &misdirected).unwrap_err();
        assert!(error.contains("another manifest"), "{error}");

        // A signature over different bytes than the payload shown.
        let mut tampered = payload.clone();
        tampered.extend_from_slice(b" ");
        let swapped = vec![(tampered, sign(&key(7), &payload))];
        assert!(trusted.verify(DIGEST, &swapped).is_err());

        let garbage = vec![(payload, "not base64!".to_string())];
        let error = trusted.verify(DIGEST, &garbage).unwrap_err();
        assert!(error.contains("not base64 DER"), "{error}");
    }

    fn payload_for_other() -> Vec<u8> {
        payload("r/p", &DIGEST.replace('4', "5"))
    }

    #[test]
    fn one_good_signature_among_bad_ones_is_enough() {
        let signer = key(7);
        let payload = payload("r/p", DIGEST);
        let layers = vec![
            (payload.clone(), sign(&key(9), &payload)),
            (payload.clone(), sign(&signer, &payload)),
        ];
        assert!(trusting(&signer).verify(DIGEST, &layers).is_ok());
    }

    #[test]
    fn the_signature_tag_is_cosigns() {
        assert_eq!(signature_tag("sha256:abc"), "sha256-abc.sig");
    }
}
