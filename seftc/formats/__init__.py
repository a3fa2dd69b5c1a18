"""Compact sparse formats: one writer/reader pair per format (`bitmask`, `csr`, `2:4`, `rice`,
and compressed-tensors' `ct-sparse-bitmask` / `ct-sparse-24-bitmask`), a fixed registry of their
names, safetensors I/O with per-tensor checksums, pack/unpack of model folders and
`load_sparse`. The specifications live in the repository's `formats/` folder.

Modules: `registry` (names -> codecs, the automatic choice), `io` (PackedWriter/PackedReader),
`packing` (pack_folder/unpack_folder), `sparse_model` (load_sparse, PackedLinear), `ct`
(compressed-tensors interop), and one module per format.
"""
