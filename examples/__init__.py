"""Examples you can copy: plug `examples.my_reward:closeness` into a recipe (see README, "Writing a custom reward
function")."""
