//! `@N/meta.json`: a revision's pcocc metadata plus what a user browsing the tree wants
//! to know without running qemu-img: the repository, the virtual disk size and each
//! layer's file and size. Pretty-printed with a final newline, for `cat`.

use std::fs::File;
use std::os::unix::fs::FileExt;

use serde_json::{Map, Value, json};

use crate::store::{Meta, Store};

/// qcow2 header: magic at offset 0 (`QFI\xfb`) and the big-endian u64 virtual size at
/// offset 24 (qemu docs/interop/qcow2.rst, "Header").
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
const QCOW2_SIZE_OFFSET: usize = 24;
const QCOW2_HEADER_PREFIX: usize = 32;

/// The virtual disk size of a qcow2 layer, read from its header; `None` when the file is
/// not qcow2.
pub fn qcow2_virtual_size(f: &File) -> Option<u64> {
    let mut head = [0u8; QCOW2_HEADER_PREFIX];
    f.read_exact_at(&mut head, 0).ok()?;
    if head[..4] != QCOW2_MAGIC {
        return None;
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&head[QCOW2_SIZE_OFFSET..QCOW2_SIZE_OFFSET + 8]);
    Some(u64::from_be_bytes(size))
}

/// The bytes of `meta.json` for `meta`, a revision of `store`.
pub fn render(store: &Store, meta: &Meta) -> Vec<u8> {
    let mut obj = match serde_json::to_value(meta) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let hashes = meta.layer_hashes().unwrap_or_default();
    let layers: Vec<Value> = hashes
        .iter()
        .map(|h| {
            let path = store.layer_path(h);
            let size = store.open_layer(h).ok().map(|(_, m)| m.len());
            json!({"sha256": h, "path": path.display().to_string(), "size": size})
        })
        .collect();
    // Only a VM image's top layer is a qcow2 disk.
    let virtual_size = hashes
        .last()
        .filter(|_| super::is_vm(meta))
        .and_then(|h| store.open_layer(h).ok())
        .and_then(|(f, _)| qcow2_virtual_size(&f));
    obj.insert("repo".into(), Value::from(store.name()));
    obj.insert("virtual_size".into(), json!(virtual_size));
    obj.insert("layers".into(), Value::Array(layers));
    let mut out = serde_json::to_vec_pretty(&Value::Object(obj)).unwrap_or_default();
    out.push(b'\n');
    out
}
