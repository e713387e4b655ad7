"""delivery/: routing and DNS, and the deliverer that tries a destination's hosts."""
