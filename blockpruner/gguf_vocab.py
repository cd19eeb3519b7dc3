"""The vocabulary part of a GGUF file (`tokenizer.*` keys), copied as llama.cpp's converter wrote it.

A model prepared from a .gguf keeps its source's vocabulary as `tokenizer.gguf` (keys only, no
tensors), so a GGUF export of it tokenizes exactly as the source file did: the Hugging Face
tokenizer transformers rebuilds from a GGUF may lose what llama.cpp needs (SentencePiece scores).
"""

from __future__ import annotations

from pathlib import Path

VOCAB_FILE = "tokenizer.gguf"


def tokenizer_fields(path: str | Path) -> list:
    """The `tokenizer.*` fields of a GGUF file (gguf-py ReaderFields)."""
    import gguf

    return [f for f in gguf.GGUFReader(str(path)).fields.values() if f.name.startswith("tokenizer.")]


def add_fields(writer, fields: list) -> None:
    """Add ReaderFields to a GGUFWriter with their own value types."""
    import gguf

    for f in fields:
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)


def write_vocab_file(source_gguf: str | Path, out: str | Path) -> None:
    """A keys-only GGUF holding the source file's vocabulary."""
    import gguf

    arch = gguf.GGUFReader(str(source_gguf)).fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(out), arch)
    add_fields(w, tokenizer_fields(source_gguf))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
