"""medvol.io."""
