"""The consortium coordinator: Flower ServerApp, strategies and run launch."""
