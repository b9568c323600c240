#!/bin/sh
# Build the seed corpora of the fuzz targets from the reference images in tests/fixtures/rafs.
# Usage: tests/fuzz/seed.sh [FIXTURES_DIR]   (run from anywhere; writes tests/fuzz/corpus/<target>/)
# Needs sh, head, tail, python3 (standard library only) and, optionally, the zstd tool.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
fixtures=${1:-$here/../fixtures/rafs}
[ -d "$fixtures" ] || { echo "no fixtures at $fixtures" >&2; exit 1; }

meta=$here/corpus/metadata
inline=$here/corpus/inline_blob
mkdir -p "$meta" "$inline"

for dir in "$fixtures"/*/; do
    case=$(basename "$dir")
    boot=$dir/bootstrap
    if [ -f "$boot" ]; then
        # Whole bootstraps (650-820 KiB: run with -max_len=1048576) and prefixes of them, so the fuzzer
        # starts from both complete images and small inputs that reach the superblock and table parsers.
        cat "$boot" > "$meta/$case-full"
        for kib in 4 8 16 64; do
            head -c $((kib * 1024)) "$boot" > "$meta/$case-head$kib"
        done
    fi
    if [ -f "$dir/bootstrap.external" ]; then
        cat "$dir/bootstrap.external" > "$meta/$case-external"
    fi
    for blob in "$dir"/blobs/*; do
        [ -f "$blob" ] || continue
        # A blob's tail holds its chunk-info array, ToC and (inline-meta) bootstrap with their tar headers.
        tail -c 16384 "$blob" > "$inline/$case-tail16k"
        if [ "$case" = v6-inline-meta ]; then
            # The last 1 MiB of the 5.5 MiB inline-meta blob holds image.boot and the ToC.
            tail -c 1048576 "$blob" > "$inline/$case-tail1m"
        fi
    done
done

# The metadata target serves its input as the content of every blob. So that it starts from inputs whose
# blob meta parses, append each v6 blob's chunk-info (CI) array and its 4 KiB header to the bootstrap and
# point the blob table and the header at the copy. Where the CI array is (or, with the zstd tool, can be
# made) uncompressed, also append the start of the blob's chunk data and move the CI entries' compressed
# offsets onto it, so some file reads, batches and decompressions succeed end to end.
python3 - "$fixtures" "$meta" "$inline" <<'PY'
import os, shutil, struct, subprocess, sys

fixtures, out, inline_out = sys.argv[1], sys.argv[2], sys.argv[3]
LIMIT = 1 << 20
OFFSET_MASK = (1 << 40) - 1
have_zstd = shutil.which("zstd") is not None
for case in sorted(os.listdir(fixtures)):
    boot = os.path.join(fixtures, case, "bootstrap")
    if not case.startswith("v6-") or not os.path.isfile(boot):
        continue
    data = bytearray(open(boot, "rb").read())
    bt_off, bt_size = struct.unpack_from("<QI", data, 1152 + 8)
    for i in range(bt_size // 256):
        e = bt_off + i * 256
        blob_id = bytes(data[e:e + 64]).rstrip(b"\0").decode()
        features, = struct.unpack_from("<I", data, e + 84)
        ci_comp, = struct.unpack_from("<I", data, e + 108)
        ci_off, ci_csize, ci_usize = struct.unpack_from("<QQQ", data, e + 112)
        with open(os.path.join(fixtures, case, "blobs", blob_id), "rb") as f:
            f.seek(ci_off)
            stored = f.read(ci_csize)
            header = bytearray(f.read(4096))
            f.seek(0)
            blob_head = f.read(LIMIT)
        ci = None
        if ci_comp == 0 and ci_csize == ci_usize:
            ci = bytearray(stored)
        elif ci_comp == 3 and have_zstd:
            ci = bytearray(subprocess.run(["zstd", "-dcq"], input=stored, stdout=subprocess.PIPE, check=True).stdout)
            assert len(ci) == ci_usize
            struct.pack_into("<I", data, e + 108, 0)
            struct.pack_into("<Q", data, e + 120, ci_usize)
            struct.pack_into("<I", header, 8, 0)
            struct.pack_into("<Q", header, 24, ci_usize)
        new_off = len(data)
        struct.pack_into("<Q", data, e + 112, new_off)
        struct.pack_into("<Q", header, 16, new_off)
        if ci is None:
            data += stored + header
            continue
        # CI v1 entries are 16 bytes, v2 entries 24; both keep the compressed offset in the low 40 bits of
        # the u64 at entry offset 8.
        entry = 24 if features & 0x4 else 16
        delta = new_off + len(ci) + len(header)
        count, = struct.unpack_from("<I", data, e + 72)
        for k in range(count):
            c, = struct.unpack_from("<Q", ci, k * entry + 8)
            struct.pack_into("<Q", ci, k * entry + 8, (c & ~OFFSET_MASK) | ((c & OFFSET_MASK) + delta))
        data += ci + header + blob_head[:max(LIMIT - delta, 0)]
    with open(os.path.join(out, case + "-with-ci"), "wb") as f:
        f.write(data)

# v5 regular files may carry HAS_HOLE (chunks need not cover the file), which the builder never sets: a
# copy of each v5 bootstrap with the flag on every regular file starts the fuzzer on that read path.
for case in sorted(os.listdir(fixtures)):
    boot = os.path.join(fixtures, case, "bootstrap")
    if not case.startswith("v5-") or not os.path.isfile(boot):
        continue
    data = bytearray(open(boot, "rb").read())
    table, = struct.unpack_from("<Q", data, 32)
    entries, = struct.unpack_from("<I", data, 56)
    for slot in range(entries):
        rec = struct.unpack_from("<I", data, table + slot * 4)[0] << 3
        mode, = struct.unpack_from("<I", data, rec + 60)
        if mode & 0o170000 == 0o100000:
            flags, = struct.unpack_from("<Q", data, rec + 80)
            struct.pack_into("<Q", data, rec + 80, flags | 0x8)
    with open(os.path.join(out, case + "-holes"), "wb") as f:
        f.write(data)

# An inline-meta blob is 5.5 MiB, mostly chunk data. Keep only what follows the chunk data (blob meta,
# digests, image.boot, ToC, with their tar headers) and move the ToC's offsets to match, so the
# inline_blob target starts from a blob whose bootstrap extracts and verifies.
for case in sorted(os.listdir(fixtures)):
    blobs = os.path.join(fixtures, case, "blobs")
    if os.path.isfile(os.path.join(fixtures, case, "bootstrap")) or not os.path.isdir(blobs):
        continue
    for name in sorted(os.listdir(blobs)):
        data = open(os.path.join(blobs, name), "rb").read()
        header = data[-512:]
        if header[:13] != b"rafs.blob.toc":
            continue
        toc_size = int(header[124:136].rstrip(b"\0").strip() or b"0", 8)
        toc = bytearray(data[-512 - toc_size:-512])
        entries = [toc[i:i + 128] for i in range(0, len(toc), 128)]
        cut = min(struct.unpack_from("<Q", e, 56)[0] for e in entries if e[8:24].rstrip(b"\0") != b"image.blob")
        cut -= 512  # the tar header that precedes the first kept section
        for i in range(0, len(toc), 128):
            offset, = struct.unpack_from("<Q", toc, i + 56)
            struct.pack_into("<Q", toc, i + 56, max(offset - cut, 0))
        with open(os.path.join(inline_out, case + "-meta-only"), "wb") as f:
            f.write(data[cut:-512 - toc_size] + toc + header)
PY
echo "seeded: $(ls "$meta" | wc -l) metadata inputs, $(ls "$inline" | wc -l) inline_blob inputs"
