"""Auth methods, one package each: its logic and its HTTP routes (`routes`). Tests mirror
them under tests/auth/."""
