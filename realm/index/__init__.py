"""Block embedding and the MIPS index."""
