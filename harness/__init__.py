"""The LongQLoRA harness (see README.md and docs/)."""
from harness import offline

offline.install()  # before anything imports bitsandbytes
