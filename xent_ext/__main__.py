"""python -m xent_ext: what is in use (versions, the build, CUDA, CPU instruction set,
threads), to paste into a bug report or to check an install."""

from ._capabilities import about


def main() -> None:
    facts = about()
    width = max(map(len, facts))
    for key, value in facts.items():
        print(f"{key + ':':<{width + 1}} {value}")


if __name__ == "__main__":
    main()
