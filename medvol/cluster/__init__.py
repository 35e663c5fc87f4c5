"""medvol.cluster."""
