"""Media handling: safe image loading, the resize policy and box geometry."""
