//! The issuer's signing keys, the way the real STS issuer publishes them: an RSA 2048 key
//! (kid `RSA_<n>`, RS256) and an EC P-384 key (kid `EC384_<n>`, ES384) per generation `n`.
//!
//! Keys are generated with aws-lc-rs on first use and stored in `<state_dir>/sts-keys/` as
//! unencrypted PKCS#8 PEM files (`RSA_0.pem`, `EC384_0.pem`, …), mode 0600 in a 0700
//! directory, so tokens verify across restarts. A file is written under a temporary name
//! and linked into place, so a crash never leaves half a key and two processes starting at
//! once never overwrite each other's key (the second loads the first one's).
//!
//! Rotation adds generation `n + 1`; new tokens are signed with it, and the JWKS publishes
//! the newest two generations, so tokens signed before a rotation keep verifying until the
//! next one. Older key files stay on disk but are no longer published.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

use super::StsError;
use super::request::SigningAlgorithm;

/// The key directory under the state directory.
pub const KEY_DIR: &str = "sts-keys";
/// How many generations the JWKS publishes (the current one and the one before).
pub const PUBLISHED_GENERATIONS: usize = 2;
const RSA_PREFIX: &str = "RSA_";
const EC_PREFIX: &str = "EC384_";
const PEM_LABEL: &str = "PRIVATE KEY";

/// One generation: an RSA and an EC key with the same index.
pub struct Generation {
    pub index: u32,
    rsa: RsaKeyPair,
    ec: EcdsaKeyPair,
}

impl Generation {
    pub fn rsa_kid(&self) -> String {
        format!("{RSA_PREFIX}{}", self.index)
    }

    pub fn ec_kid(&self) -> String {
        format!("{EC_PREFIX}{}", self.index)
    }

    /// The public keys as JWKs: the RSA key without `alg`, the EC key with `alg: ES384`
    /// (what the real issuer publishes).
    fn jwks(&self) -> [Value; 2] {
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        let rsa = self.rsa.public_key();
        let rsa_jwk = json!({
            "kty": "RSA",
            "kid": self.rsa_kid(),
            "use": "sig",
            "n": b64(rsa.modulus().big_endian_without_leading_zero()),
            "e": b64(rsa.exponent().big_endian_without_leading_zero()),
        });
        // Uncompressed SEC 1 point: 0x04 || x || y, 48 bytes each for P-384.
        let point = self.ec.public_key().as_ref();
        let (x, y) = point
            .get(1..)
            .unwrap_or_default()
            .split_at(point.len().saturating_sub(1) / 2);
        let ec_jwk = json!({
            "kty": "EC",
            "kid": self.ec_kid(),
            "use": "sig",
            "alg": "ES384",
            "crv": "P-384",
            "x": b64(x),
            "y": b64(y),
        });
        [rsa_jwk, ec_jwk]
    }
}

/// All generations found in (or created in) the key directory, oldest first.
pub struct KeyRing {
    dir: PathBuf,
    generations: Vec<Generation>,
}

impl KeyRing {
    /// Loads every generation in `<state_dir>/sts-keys/`, generating generation 0 when there
    /// is none and completing a generation with one key missing (a rotation cut short).
    pub fn open(state_dir: &Path) -> Result<KeyRing, StsError> {
        let dir = state_dir.join(KEY_DIR);
        fs::create_dir_all(&dir).map_err(|e| state_err(&dir, e))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| state_err(&dir, e))?;
        let mut indexes: Vec<u32> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| state_err(&dir, e))? {
            let entry = entry.map_err(|e| state_err(&dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str().and_then(|n| n.strip_suffix(".pem")) else {
                continue;
            };
            let index = name
                .strip_prefix(RSA_PREFIX)
                .or_else(|| name.strip_prefix(EC_PREFIX))
                .and_then(|n| n.parse::<u32>().ok());
            if let Some(i) = index.filter(|i| !indexes.contains(i)) {
                indexes.push(i);
            }
        }
        indexes.sort_unstable();
        if indexes.is_empty() {
            indexes.push(0);
        }
        let generations = indexes
            .into_iter()
            .map(|i| load_or_create(&dir, i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KeyRing { dir, generations })
    }

    /// The generation new tokens are signed with.
    pub fn current(&self) -> &Generation {
        // `open` always leaves at least one generation.
        &self.generations[self.generations.len() - 1]
    }

    /// The generations the JWKS publishes, oldest first.
    pub fn published(&self) -> &[Generation] {
        let n = self.generations.len();
        &self.generations[n.saturating_sub(PUBLISHED_GENERATIONS)..]
    }

    /// Adds and persists the next generation; returns its kids.
    pub fn rotate(&mut self) -> Result<[String; 2], StsError> {
        let next = self
            .current()
            .index
            .checked_add(1)
            .ok_or(StsError::Crypto("key index overflow"))?;
        let generation = load_or_create(&self.dir, next)?;
        let kids = [generation.rsa_kid(), generation.ec_kid()];
        self.generations.push(generation);
        Ok(kids)
    }

    /// The JWKS document: `{"keys": [...]}` for the published generations.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self.published().iter().flat_map(Generation::jwks).collect();
        json!({ "keys": keys })
    }

    /// Signs `input` with the current key for `alg`; returns the kid and the JWS signature
    /// (PKCS #1 v1.5 for RS256, fixed-size `r || s` for ES384).
    pub fn sign(&self, alg: SigningAlgorithm, input: &[u8]) -> Result<(String, Vec<u8>), StsError> {
        let g = self.current();
        let rng = SystemRandom::new();
        match alg {
            SigningAlgorithm::Rs256 => {
                let mut sig = vec![0u8; g.rsa.public_modulus_len()];
                g.rsa
                    .sign(&signature::RSA_PKCS1_SHA256, &rng, input, &mut sig)
                    .map_err(|_| StsError::Crypto("RSA signing failed"))?;
                Ok((g.rsa_kid(), sig))
            }
            SigningAlgorithm::Es384 => {
                let sig =
                    g.ec.sign(&rng, input)
                        .map_err(|_| StsError::Crypto("ECDSA signing failed"))?;
                Ok((g.ec_kid(), sig.as_ref().to_vec()))
            }
        }
    }
}

fn state_err(path: &Path, e: std::io::Error) -> StsError {
    StsError::State {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn load_or_create(dir: &Path, index: u32) -> Result<Generation, StsError> {
    let rsa_path = dir.join(format!("{RSA_PREFIX}{index}.pem"));
    let ec_path = dir.join(format!("{EC_PREFIX}{index}.pem"));
    let rsa_der = load_or_create_der(&rsa_path, || {
        let pair = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .map_err(|_| StsError::Crypto("RSA key generation failed"))?;
        let der = pair
            .as_der()
            .map_err(|_| StsError::Crypto("RSA key encoding failed"))?;
        Ok(der.as_ref().to_vec())
    })?;
    let ec_der = load_or_create_der(&ec_path, || {
        let doc = EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            &SystemRandom::new(),
        )
        .map_err(|_| StsError::Crypto("EC key generation failed"))?;
        Ok(doc.as_ref().to_vec())
    })?;
    let rsa = RsaKeyPair::from_pkcs8(&rsa_der).map_err(|e| StsError::Key {
        path: rsa_path.clone(),
        reason: format!("not an RSA PKCS#8 private key: {e}"),
    })?;
    if rsa.public_modulus_len() < 256 {
        return Err(StsError::Key {
            path: rsa_path,
            reason: "RSA key shorter than 2048 bits".into(),
        });
    }
    let ec = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &ec_der)
        .map_err(|e| StsError::Key {
            path: ec_path,
            reason: format!("not a P-384 PKCS#8 private key: {e}"),
        })?;
    Ok(Generation { index, rsa, ec })
}

/// Reads the PEM file at `path`, or creates it with the DER from `generate`.
fn load_or_create_der(
    path: &Path,
    generate: impl FnOnce() -> Result<Vec<u8>, StsError>,
) -> Result<Vec<u8>, StsError> {
    match fs::read(path) {
        Ok(pem) => {
            warn_if_readable(path);
            return pem_to_der(&pem).ok_or_else(|| StsError::Key {
                path: path.to_owned(),
                reason: format!("not a PEM \"{PEM_LABEL}\" file"),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(state_err(path, e)),
    }
    let der = generate()?;
    let tmp = path.with_extension(format!("pem.tmp-{:016x}", rand::random::<u64>()));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(der_to_pem(&der).as_bytes())?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(state_err(&tmp, e));
    }
    // `hard_link` fails if the name exists: a concurrent start that won keeps its key.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "generated STS signing key");
            Ok(der)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let pem = fs::read(path).map_err(|e| state_err(path, e))?;
            pem_to_der(&pem).ok_or_else(|| StsError::Key {
                path: path.to_owned(),
                reason: format!("not a PEM \"{PEM_LABEL}\" file"),
            })
        }
        Err(e) => Err(state_err(path, e)),
    }
}

fn warn_if_readable(path: &Path) {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "STS signing key is readable by group or others");
    }
}

/// PKCS#8 DER → PEM with 64-character lines.
pub fn der_to_pem(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {PEM_LABEL}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {PEM_LABEL}-----\n"));
    out
}

/// The DER inside the first `PRIVATE KEY` PEM block.
pub fn pem_to_der(pem: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let begin = format!("-----BEGIN {PEM_LABEL}-----");
    let end = format!("-----END {PEM_LABEL}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let b64: String = text[start..stop].split_whitespace().collect();
    STANDARD.decode(b64).ok()
}
