"""The encoder service: image bytes in, style embeddings out, over gRPC (DESIGN.md §2).

Images are decoded and letterboxed exactly as in training, batched across concurrent calls, and encoded
by the exported TorchScript encoders in-process or on a Triton server. Import names from the module that
holds them (`encoder_service.app`, `.config`, `.server`, ...): this package imports nothing, so `ctl`'s
parser can read `encoder_service.config` in the ranker's image (no torch, no Pillow).
"""
