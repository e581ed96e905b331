"""The ranker's product store: one small interface (`base`), two Qdrant adapters (DESIGN.md §2).

`edge.open_edge_store` opens the embedded default (qdrant-edge, a directory per model version);
`client.open_client_store` opens a collection on a Qdrant server/cluster (or qdrant-client's local mode).
Import from the module that holds a name: importing the package loads neither adapter (qdrant-client alone
takes half a second, which `ctl --help` must not pay).
"""
