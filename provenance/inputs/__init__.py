"""Inputs: the content-addressed store and fetchers, safe extraction, dataset selection and manifest,
licences. What both the builder and `verify-attestation --inputs` need."""
