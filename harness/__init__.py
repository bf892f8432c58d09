"""The LongQLoRA harness (see README.md and docs/)."""
from harness import offline, quiet

offline.install()  # before anything imports bitsandbytes
quiet.install()  # before anything imports deepspeed
