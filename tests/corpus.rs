// Placeholder until the corpus replay lands (helper writing it).
