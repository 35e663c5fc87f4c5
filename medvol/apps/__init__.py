"""medvol.apps."""
