"""The reproducibility questions about two builds: compare, the reproduced verdict, transcripts and
diverge, the matrix, rebuild and the CI gate. May use the builder and the verifier; neither uses it."""
