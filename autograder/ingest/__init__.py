"""What comes in: submission folders, zips and LMS downloads (`discover`, `lms`) and the lesson's notebook spec and reading of a submitted notebook (`notebook`)."""
