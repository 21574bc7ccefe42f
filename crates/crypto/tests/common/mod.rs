//! Known-answer vectors kept under `keys/vectors/`.
//!
//! A vector file is UTF-8 text: `#` comment lines, blank lines, and
//! `name = lowercase hex` (or `name = "text"`) lines. A test computes its values
//! from fixed seeds and compares them with the committed file, so any change of
//! an encoding or derivation fails the test. To (re)create a file on purpose,
//! run the test with `MESSENGER_WRITE_VECTORS=1`; this is refused under CI.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;

/// A deterministic RNG for fixture generation.
pub(crate) fn seeded_rng(seed: u64) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../keys/vectors")
}

fn parse(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once(" = ")
            .unwrap_or_else(|| panic!("vector line {} is not `name = value`", n + 1));
        map.insert(k.trim().to_string(), v.trim().to_string());
    }
    map
}

/// Compares `values` (name, value) with `keys/vectors/<file>`, in order.
/// A value is written as given: hex for bytes, `"..."` for text.
pub(crate) fn check(file: &str, header: &str, values: &[(&str, String)]) {
    let path = vectors_dir().join(file);
    if std::env::var_os("MESSENGER_WRITE_VECTORS").is_some() {
        assert!(
            std::env::var_os("CI").is_none(),
            "refusing to rewrite vectors under CI"
        );
        let mut out = String::new();
        for line in header.lines() {
            out.push_str("# ");
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
        for (k, v) in values {
            out.push_str(&format!("{k} = {v}\n"));
        }
        std::fs::write(&path, out).unwrap();
        return;
    }
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let stored = parse(&text);
    assert_eq!(
        stored.len(),
        values.len(),
        "{file}: {} stored values, {} computed",
        stored.len(),
        values.len()
    );
    for (k, v) in values {
        let s = stored
            .get(*k)
            .unwrap_or_else(|| panic!("{file}: no stored value {k}"));
        assert_eq!(s, v, "{file}: {k} changed");
    }
}

/// Hex of bytes.
pub(crate) fn hx(bytes: impl AsRef<[u8]>) -> String {
    hex::encode(bytes)
}
