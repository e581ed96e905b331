"""The application layer of ctl: the `ctl` command line, the demo, the ingestion job, the HTML reports, the
local stack and the snapshot commands. It sits on top of everything else (docs/ARCHITECTURE.md): it may
import the services, the model package and the foundation; nothing imports it.
"""
