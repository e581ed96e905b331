"""Generated from protos/ctl/v1 by `python -m ctl.codegen`; do not edit."""
