#!/usr/bin/env python3
"""Deterministic inputs for bench/run (standard library only).

  gen.py disk OUT SIZE FILL SEED
      A sparse raw disk of SIZE bytes holding about FILL bytes of data in extents of
      4 KiB..16 MiB (log-uniform sizes, 4 KiB aligned, never overlapping), each extent
      one of: random bytes (incompressible), "text" (words, deflate ~0.3), "binary"
      (skewed bytes, half zeros), or an explicit zero run (written zeros, which an
      importer or converter should turn back into a hole). Same SEED, same bytes.

  gen.py overlay SIZE FRACTION SEED
      qemu-io commands (one per line) that rewrite about FRACTION of a SIZE disk in
      extents of 4 KiB..1 MiB at unaligned-to-cluster offsets: pattern writes and zero
      writes, so that an overlay has partial (copied-on-write) clusters and zeroed ones.

  gen.py store REPO NAME LAYER...
      Stores a chain of qcow2 files (base first) as revision NAME@0 of the pcocc
      repository REPO, the way pcocc keeps one: each layer named by its sha256 under
      data/XX/, backing names rewritten to the relative ../../data/XX/HASH (qemu-img
      rebase -u, same content), metadata JSON in meta/NAME@0. Prints the layer paths.
      The base layer is hard-linked from its source when both sit on one filesystem.

  gen.py many REPO NAME COUNT LAYER_HASH
      COUNT revisions NAME@0..COUNT-1 all pointing at one stored layer (metadata only).

  gen.py images REPO PREFIX COUNT LAYER_HASH
      COUNT images PREFIX00000@0, PREFIX00001@0, ... all pointing at one stored layer
      (metadata only): a repository with many images, as pcocc's copy makes them.

  gen.py sparse SIZE COUNT SEED
      qemu-io commands (one per line) that write COUNT extents of 4 KiB..256 KiB
      (log-uniform, 4 KiB aligned), one at a seeded place in each of COUNT equal slots of
      a SIZE disk, the last one ending at the disk's end: a little data spread over the
      whole range, so that every qcow2 L2 table of a huge sparse disk is in use.

  gen.py full OUT SIZE SEED
      A raw disk of SIZE bytes with every byte written, in 1 MiB chunks that cycle
      through random bytes, "text" and "binary" (as in `disk`): real, partly
      compressible data with no hole and no zero run.
"""

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys

KIB = 1024
MIB = 1024 * KIB
BLOCK = 4 * KIB  # extent alignment: the guest block size
MIN_EXTENT = 4 * KIB  # issue 6: extents of 4 KiB..16 MiB
MAX_EXTENT = 16 * MIB
WORDS = [
    "the", "of", "and", "kernel", "image", "qcow2", "cluster", "block", "data", "root",
    "mount", "layer", "revision", "read", "write", "guest", "virtual", "machine", "disk",
    "file", "system", "page", "cache", "offset", "table", "entry", "header", "zero",
]


def log_uniform(rng, lo, hi):
    """A size between lo and hi, uniform in log scale, rounded to BLOCK."""
    v = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return max(lo, int(v) // BLOCK * BLOCK)


def text_block(rng, n):
    out = bytearray()
    while len(out) < n:
        # Zipf-like: early words much more frequent.
        w = WORDS[min(len(WORDS) - 1, int(rng.paretovariate(1.2)) - 1)]
        out += w.encode() + (b"\n" if rng.random() < 0.1 else b" ")
    return bytes(out[:n])


def binary_block(rng, n):
    # Half zeros, the rest small values: what executables and filesystem metadata look like.
    table = bytes([0] * 8 + [1, 2, 3, 4, 0xFF, 0x10, 0x20, rng.randrange(256)])
    return bytes(table[b & 15] for b in rng.randbytes(n))


def disk(out, size, fill, seed):
    rng = random.Random(seed)
    # Source blocks for the compressible kinds, sliced at random offsets per extent.
    text = text_block(rng, 8 * MIB)
    binary = binary_block(rng, 8 * MIB)
    extents = []
    taken = 0
    attempts = 0
    while taken < fill and attempts < 100000:
        attempts += 1
        n = min(log_uniform(rng, MIN_EXTENT, MAX_EXTENT), size)
        off = rng.randrange(0, (size - n) // BLOCK + 1) * BLOCK
        if any(off < e + l and e < off + n for e, l, _ in extents):
            continue
        kind = rng.choices(["random", "text", "binary", "zero"], [30, 30, 30, 10])[0]
        extents.append((off, n, kind))
        taken += n
    extents.sort()
    with open(out, "wb") as f:
        f.truncate(size)
        for off, n, kind in extents:
            f.seek(off)
            done = 0
            while done < n:
                c = min(n - done, 4 * MIB)
                if kind == "random":
                    buf = rng.randbytes(c)
                elif kind == "zero":
                    buf = bytes(c)
                else:
                    src = text if kind == "text" else binary
                    s = rng.randrange(0, len(src) - c + 1)
                    buf = src[s : s + c]
                f.write(buf)
                done += c
    data = sum(n for _, n, k in extents if k != "zero")
    print(f"{out}: {len(extents)} extents, {data} data bytes, {taken - data} zero-run bytes")


def overlay(size, fraction, seed):
    rng = random.Random(seed)
    target = int(size * fraction)
    done = 0
    while done < target:
        n = log_uniform(rng, 4 * KIB, 1 * MIB)
        # 512-byte aligned, so most writes cover partial clusters (copy on write).
        off = rng.randrange(0, (size - n) // 512) * 512
        if rng.random() < 0.1:
            print(f"write -q -z {off} {n}")
        else:
            print(f"write -q -P {rng.randrange(1, 256)} {off} {n}")
        done += n


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 * MIB)
            if not b:
                return h.hexdigest()
            h.update(b)


def cached_sha256(path):
    """sha256 of path, remembered in path.sha256 while its size and mtime stay the same."""
    st = os.stat(path)
    key = f"{st.st_size} {st.st_mtime_ns}"
    cache = path + ".sha256"
    try:
        with open(cache) as f:
            k, h = f.read().rsplit(" ", 1)
        if k == key:
            return h.strip()
    except (OSError, ValueError):
        pass
    h = sha256(path)
    with open(cache, "w") as f:
        f.write(f"{key} {h}\n")
    return h


def store(repo, name, layers):
    for d in ("data", "meta", ".tmp"):
        os.makedirs(os.path.join(repo, d), exist_ok=True)
    # The repository format marker pcocc writes on creation (format version 2).
    with open(os.path.join(repo, ".config"), "w") as f:
        f.write("version: 2\n")
    hashes = []
    for src in layers:
        tmp = os.path.join(repo, ".tmp", "bench-layer")
        if hashes:
            # An overlay's backing name is rewritten: it needs a copy of its own.
            shutil.copyfile(src, tmp)
            below = hashes[-1]
            subprocess.run(
                ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2",
                 "-b", f"../../data/{below[:2]}/{below}", tmp],
                check=True,
            )
            h = sha256(tmp)
        else:
            # A base layer is stored as is: a hard link saves copying GiBs on every run
            # (a copy when the image sits on another filesystem), and its hash is the
            # source's, computed once.
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            h = cached_sha256(src)
        dst = os.path.join(repo, "data", h[:2], h)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(dst):
            os.unlink(tmp)
        else:
            os.chmod(tmp, 0o444)
            os.rename(tmp, dst)
        hashes.append(h)
        print(dst)
    write_meta(repo, name, 0, hashes)


def write_meta(repo, name, rev, hashes):
    meta = {
        "name": name, "revision": rev, "kind": "vm", "owner": "root",
        "timestamp": 1795749382.5, "data_blobs": hashes, "custom_meta": {},
    }
    with open(os.path.join(repo, "meta", f"{name}@{rev}"), "w") as f:
        json.dump(meta, f)


def many(repo, name, count, layer):
    for rev in range(count):
        write_meta(repo, name, rev, [layer])


def images(repo, prefix, count, layer):
    for i in range(count):
        write_meta(repo, f"{prefix}{i:05d}", 0, [layer])


def sparse(size, count, seed):
    rng = random.Random(seed)
    slot = size // count
    for i in range(count):
        n = log_uniform(rng, 4 * KIB, 256 * KIB)
        if i == count - 1:
            off = size - n
        else:
            off = i * slot + rng.randrange(0, (slot - n) // BLOCK) * BLOCK
        print(f"write -q -P {rng.randrange(1, 256)} {off} {n}")


def full(out, size, seed):
    rng = random.Random(seed)
    text = text_block(rng, 8 * MIB)
    binary = binary_block(rng, 8 * MIB)
    chunk = 1 * MIB
    with open(out, "wb") as f:
        for i in range(size // chunk):
            kind = i % 3
            if kind == 0:
                f.write(rng.randbytes(chunk))
            else:
                src = text if kind == 1 else binary
                s = rng.randrange(0, len(src) - chunk + 1)
                f.write(src[s : s + chunk])
        f.write(rng.randbytes(size % chunk))


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "disk" and len(argv) == 6:
        disk(argv[2], int(argv[3]), int(argv[4]), int(argv[5]))
    elif cmd == "overlay" and len(argv) == 5:
        overlay(int(argv[2]), float(argv[3]), int(argv[4]))
    elif cmd == "store" and len(argv) >= 5:
        store(argv[2], argv[3], argv[4:])
    elif cmd == "many" and len(argv) == 6:
        many(argv[2], argv[3], int(argv[4]), argv[5])
    elif cmd == "images" and len(argv) == 6:
        images(argv[2], argv[3], int(argv[4]), argv[5])
    elif cmd == "sparse" and len(argv) == 5:
        sparse(int(argv[2]), int(argv[3]), int(argv[4]))
    elif cmd == "full" and len(argv) == 5:
        full(argv[2], int(argv[3]), int(argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
