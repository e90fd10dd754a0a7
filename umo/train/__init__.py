"""ReReFL training: the step (`rerefl`), and the accelerate loop around it."""
