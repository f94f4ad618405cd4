"""How TinyLM's messages say a count: "1 story", "2 stories", "1,024 tokens"."""


def plural(n: int, noun: str) -> str:
    """n and the noun (its last word in the plural unless n is 1: story -> stories), thousands separated by commas."""
    if n == 1:
        return f"{n:,} {noun}"
    many = noun[:-1] + "ies" if noun.endswith("y") and noun[-2:-1] not in tuple("aeiou") else noun + "s"
    return f"{n:,} {many}"
