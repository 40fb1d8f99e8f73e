"""The resume server (layer 9, over `transfer`) and its test tools: a delaying TCP relay and network-namespace pairs."""
