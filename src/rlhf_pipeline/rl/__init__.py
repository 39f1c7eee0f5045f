"""PPO-max (plain torch, no kedro): the maths, the experience maker and the trainer."""
