"""The hospital site agent: Flower ClientApp and site commands."""
