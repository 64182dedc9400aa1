"""Reading, tokenizing, bucketing and mixing task data."""
