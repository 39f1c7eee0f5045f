"""Training core shared by SFT, reward modelling and PPO (plain torch + DeepSpeed, no kedro)."""
