"""Small update pieces shared by optimizers: moments, diagonal scaling, grafting."""
