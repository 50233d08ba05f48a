"""netsetup: transparent capture (nftables TPROXY + policy routing) inside workload netns."""
