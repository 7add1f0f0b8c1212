"""Private machinery shared by every layer: hashing, reading safetensors, strict JSON, atomic files,
progress. Nothing here knows about recipes, builds or attestations."""
