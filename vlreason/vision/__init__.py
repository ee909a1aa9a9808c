"""Media handling: safe image loading, the resize policy, box geometry and video file checks."""
