"""Where things are by default, written once: the services' ports and addresses, and the embedded store.

The configs (encoder_service/config.py, ranker_service/config.py), the commands (`ctl demo`, `ctl ingest`,
`ctl restore`) and the docs use these; the deploy manifests keep literal numbers, and tests/test_deploy.py
checks that they agree with these.
"""

from __future__ import annotations

ENCODER_PORT = 50051
RANKER_PORT = 50052
ENCODER_METRICS_PORT = 9464
RANKER_METRICS_PORT = 9465
TRITON_GRPC_PORT = 8001  # Triton's own default gRPC port

ENCODER_ADDRESS = f"localhost:{ENCODER_PORT}"
RANKER_ADDRESS = f"localhost:{RANKER_PORT}"
TRITON_ADDRESS = f"localhost:{TRITON_GRPC_PORT}"

# The embedded store's directory, one per model ({model_version} is replaced), and the one variable that
# names it for every command that opens it (`ctl serve-ranker`, `ctl ingest --embedded`, `ctl restore`).
STORE_PATH = "ctl-store/{model_version}"
STORE_PATH_ENV = "CTL_RANKER_STORE_PATH"
