"""medvol.losses."""
