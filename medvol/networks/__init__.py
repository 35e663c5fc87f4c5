"""medvol.networks."""
